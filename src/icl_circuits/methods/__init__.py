"""The paper's algorithms: task vectors, TVC, ITO, steering heatmaps, detection, circuits, examples."""
