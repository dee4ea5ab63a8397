"""Tasks, prompts and training text."""
