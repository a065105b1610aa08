"""Run dicom3tools' ``dciodvfy`` on written files: the check that a DICOM object follows its IOD.

One contradiction inside dciodvfy is set aside, and only for Ophthalmic Tomography: the OPT Image
module of PS3.3 fixes Concatenation Frame Offset Number, In-concatenation Number and In-concatenation
Total Number to 0, 1 and 1 (an OPT instance is never part of a concatenation), and dciodvfy checks
that, while its generic Multi-frame Functional Groups check reports the very same three attributes as
not allowed outside a concatenation. Written without them, the OPT check fails instead; no encoding
passes both. Every other "Error" line counts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hrf_batch.export.errors import ExportError

OPT_CONCATENATION_CONTRADICTION = (
    "Error - Attribute present when condition unsatisfied (which may not be present otherwise) Type 1C "
    "Conditional Element=<ConcatenationFrameOffsetNumber> Module=<MultiFrameFunctionalGroupsCommon>",
    "Error - Attribute present when condition unsatisfied (which may not be present otherwise) Type 1C "
    "Conditional Element=<InConcatenationNumber> Module=<MultiFrameFunctionalGroupsCommon>",
    "Error - Cannot be less than or equal to one since then not a Concatenation - attribute <InConcatenationTotalNumber>",
)
_TIMEOUT_S = 120


@dataclass(frozen=True)
class Validation:
    """dciodvfy's verdict on one file: its error and warning lines (errors without the known contradiction)."""

    path: Path
    iod: str
    errors: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


def find_dciodvfy() -> Path:
    """dciodvfy on PATH, else beside the running Python (the project's virtual environment installs it)."""
    found = shutil.which("dciodvfy") or shutil.which("dciodvfy", path=str(Path(sys.executable).parent))
    if found is None:
        raise ExportError("dciodvfy (dicom3tools) is not installed, so written DICOM files cannot be validated",
                          "install the project's dependencies again (it comes with the dicom3tools package)")
    return Path(found)


def validate(path: Path) -> Validation:
    """Run dciodvfy on ``path`` and sort its lines into errors and warnings."""
    try:
        done = subprocess.run([str(find_dciodvfy()), str(path)], capture_output=True, text=True, timeout=_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExportError(f"{path}: dciodvfy could not be run ({exc})", "check the dicom3tools installation") from exc
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    iod = next((line for line in lines if not line.startswith(("Error", "Warning", "Abort"))), "")
    known = OPT_CONCATENATION_CONTRADICTION if iod == "OphthalmicTomographyImage" else ()
    errors = tuple(line for line in lines if line.startswith(("Error", "Abort")) and line not in known)
    warnings = tuple(line for line in lines if line.startswith("Warning"))
    return Validation(Path(path), iod, errors, warnings)
