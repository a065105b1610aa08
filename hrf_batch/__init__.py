"""hrf-batch: count and outline hyper-reflective foci in clinical OCT studies."""

__version__ = "0.1.0"
