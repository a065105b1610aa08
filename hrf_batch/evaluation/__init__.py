"""How good the classifier and the pipeline are on a labelled study: classification metrics,
segmentation metrics against ground-truth masks, and prompt-size calibration."""
