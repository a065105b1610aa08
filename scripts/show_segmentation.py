"""Draw a written DICOM Segmentation over the B-scans it references, as a viewer would show it.

    .venv/bin/python scripts/show_segmentation.py DIR OUT.png [--search STUDY_DIR] [--bscans 4]

DIR is one volume folder of `hrf-batch export --dicom-seg` (or any folder above one: the first SEG found
is used). The SEG is opened with highdicom; the images it references are looked up by SOP Instance UID
in DIR (the OPT written for HEYEX sources) and in the --search folders (the original DICOM OCT files of a
DICOM source). The B-scans with the most HRF pixels are drawn with the mask outlines in colour, pixels
square (as OCT viewers show them): whole, and enlarged around the rows that hold HRF.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import highdicom as hd
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402


def find_instances(folders: list[Path], wanted: set[str]) -> dict[str, Path]:
    """SOP Instance UID -> file, for the wanted UIDs found under ``folders`` (headers only)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or len(found) == len(wanted):
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except (pydicom.errors.InvalidDicomError, OSError, ValueError):
                continue
            uid = str(ds.get("SOPInstanceUID", ""))
            if uid in wanted:
                found[uid] = path
    return found


def seg_frames(seg: hd.seg.Segmentation) -> list[tuple[str, int]]:
    """(source instance, source frame) of every SEG frame, from its Derivation Image Sequence."""
    out = []
    for group in seg.PerFrameFunctionalGroupsSequence:
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        out.append((str(source.ReferencedSOPInstanceUID), int(source.get("ReferencedFrameNumber") or 1)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--search", type=Path, action="append", default=[], help="folder holding the source DICOM files")
    parser.add_argument("--bscans", type=int, default=4, help="how many B-scans to draw (most HRF first)")
    args = parser.parse_args(argv)
    segs = sorted(args.folder.rglob("SEG_*.dcm"))
    if not segs:
        print(f"no SEG_*.dcm under {args.folder}: run `hrf-batch export --dicom-seg` first", file=sys.stderr)
        return 1
    seg = hd.seg.segread(segs[0])
    frames = seg_frames(seg)
    sources = find_instances([segs[0].parent, *args.search], {uid for uid, _ in frames})
    missing = {uid for uid, _ in frames} - set(sources)
    if missing:
        print(f"{len(missing)} referenced instance(s) not found; pass the study folder with --search", file=sys.stderr)
        return 1
    areas = [int(seg.get_pixels_by_source_frame(uid, source_frame_numbers=[n], segment_numbers=[1]).sum())
             for uid, n in frames]
    order = sorted(range(len(frames)), key=lambda k: -areas[k])[: args.bscans]
    segment = seg.SegmentSequence[0]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    fig, axes = plt.subplots(len(order), 2, figsize=(12, 2.8 * len(order)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.2]})
    for row, k in zip(axes, order):
        uid, number = frames[k]
        source = pydicom.dcmread(sources[uid])
        pixels = source.pixel_array
        image = pixels[number - 1] if pixels.ndim == 3 else pixels
        mask = seg.get_pixels_by_source_frame(uid, source_frame_numbers=[number], segment_numbers=[1])[0, :, :, 0]
        rows = np.nonzero(mask.any(axis=1))[0]
        top, bottom = (max(rows[0] - 40, 0), min(rows[-1] + 40, image.shape[0])) if rows.size else (0, image.shape[0])
        for ax, (r0, r1) in zip(row, ((0, image.shape[0]), (top, bottom))):
            ax.imshow(image[r0:r1], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.contour(mask[r0:r1].astype(float), levels=[0.5], colors=["#ff3b30"], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_title(f"{source.Modality} {sources[uid].name[:24]}... frame {number}", fontsize=8)
        row[1].set_title(f"rows {top}-{bottom}: {areas[k]} HRF pixels outlined", fontsize=8)
    eye = {"R": "right eye", "L": "left eye"}.get(str(source.get("ImageLaterality", "")), "eye unknown")
    fig.suptitle(f'{segs[0].name[:40]}...\nsegment "{segment.SegmentLabel}" ({kind.CodeMeaning}, SCT {kind.CodeValue}), '
                 f"{algorithm.AlgorithmName} {algorithm.AlgorithmVersion}; patient {seg.PatientID}, {eye}", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}: {len(order)} of {len(frames)} SEG frames from {segs[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
