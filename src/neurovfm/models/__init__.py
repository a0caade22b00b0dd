"""Models: the packed 3D ViT encoder, the JEPA predictor, and the model-folder format."""
