"""Training a classifier from image-level labels: augmentation and the training loop."""
