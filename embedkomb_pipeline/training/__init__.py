"""Training embedding models on verified pairs: losses, the training-set builder, the coordinate-ascent trainer."""
