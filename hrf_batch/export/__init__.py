"""Results out in the imaging world's formats: DICOM Segmentation (and DICOM OCT for HEYEX sources) and NIfTI.

Cohort CSVs live in ``hrf_batch.report``; this package writes the masks themselves, next to the pixels they
outline, so that PACS, OHIF, 3D Slicer and ITK-SNAP can open them. The pixels are read again from the
analysed source files (the database keeps only masks), and only while those files are unchanged.
"""

from hrf_batch.export.dicom import export_dicom
from hrf_batch.export.errors import ExportError, SourceUnavailable
from hrf_batch.export.nifti import export_nifti
from hrf_batch.export.volumes import ExportSummary

__all__ = ["ExportError", "ExportSummary", "SourceUnavailable", "export_dicom", "export_nifti"]
