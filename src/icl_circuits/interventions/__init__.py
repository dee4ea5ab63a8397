"""How the model is changed: SAE splicing and steering."""
