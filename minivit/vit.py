"""PLACEHOLDER: the Vision Transformer is being written (issue 3)."""
