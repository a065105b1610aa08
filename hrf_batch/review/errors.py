"""Errors of the review page; the CLI shows them as one line, the page as a short message."""

from __future__ import annotations

from hrf_batch.errors import HrfBatchError


class ReviewError(HrfBatchError):
    """The review page could not start, or could not do what a grader asked."""


class ReviewNotFound(ReviewError):
    """A run, B-scan, lesion or patient the page asked for is not in the database."""
