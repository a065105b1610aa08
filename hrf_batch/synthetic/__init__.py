"""Synthetic OCT studies with HRF ground truth: B-scan generators, localizer images, study writer."""
