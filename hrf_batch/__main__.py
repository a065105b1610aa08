"""`python -m hrf_batch` is the same as the `hrf-batch` command."""

from hrf_batch.cli import main

main()
