"""Model layer: the U-Net, its loss, region metrics and inference."""
