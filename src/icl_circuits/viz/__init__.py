"""Figures, the HTML report and the viewer."""
