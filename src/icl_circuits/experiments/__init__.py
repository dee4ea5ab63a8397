"""Recipes of CLI stages, the reproduce runner and the paper's claims."""
