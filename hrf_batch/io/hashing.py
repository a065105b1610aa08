"""File hashes: what makes a source (and a model or a SAM 2 checkpoint) the same file as before.

One definition, so a volume's ``source_sha256``, a model id and a segmenter checkpoint hash are
all computed the same way: sha256 over the bytes, read in 1 MiB chunks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of_files(paths: Iterable[Path]) -> str:
    """sha256 of one file, or of the sorted per-file digests for a multi-file source (a DICOM
    series, an XML export with its TIFFs), so the order the files were found in does not matter."""
    digests = [sha256_file(Path(p)) for p in paths]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
