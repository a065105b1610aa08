"""Results out in the imaging world's formats: DICOM Segmentation (and DICOM OCT for HEYEX sources) and NIfTI.

Cohort CSVs live in ``hrf_batch.report``; this package writes the masks themselves, next to the pixels they
outline, so that PACS, OHIF, 3D Slicer and ITK-SNAP can open them.
"""
