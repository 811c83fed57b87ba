"""The PyTorch side of openelm-mlx: the reference model and the trainer. The only code that imports torch."""
