"""Training a classifier from image-level labels: augmentation, B-scan sources (in memory or
streamed from their files), per-step batch sampling, DDP processes and the training loop."""
