"""minivit: ViT, DINO and ResNet from scratch. See README.md for the map of the code."""
