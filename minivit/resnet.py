"""PLACEHOLDER: ResNet is being written (issue 4)."""
