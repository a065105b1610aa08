"""Cross-generator evaluation and the guards' on/off table, as Markdown for the model card.

    .venv/bin/python scripts/cross_generator.py table  --model A=DIR --model B=DIR --study A=DIR --study B=DIR
    .venv/bin/python scripts/cross_generator.py guards --model DIR --study DIR
    .venv/bin/python scripts/cross_generator.py paper  --model CCT=DIR --model MIL=DIR --study DIR

Every number comes from ``evaluate_classifier`` and ``evaluate_segmentation`` (the code behind
``hrf-batch evaluate --segmentation``) on studies with pixel ground truth; ``--json FILE`` keeps the
full results. The region-growing segmenter is used unless ``--segmenter`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from hrf_batch.evaluation.classification import evaluate_classifier
from hrf_batch.evaluation.segmentation import evaluate_segmentation
from hrf_batch.io.labels import load_study_labels
from hrf_batch.model.classify import Classifier, load_classifier
from hrf_batch.pipeline import PipelineParams
from hrf_batch.segment import make_segmenter


def _pairs(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        name, _, path = v.rpartition("=")
        out.append((name or Path(path).name, Path(path)))
    return out


def _f(v: Any, digits: int = 3) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if x != x else f"{x:.{digits}f}"


def _header(text: str) -> list[str]:
    """A Markdown table header and its separator row."""
    return [text, "|" + "---|" * (text.count("|") - 1)]


def _lesion_cells(seg: dict[str, Any]) -> str:
    """Lesion P, R, F1, Dice over HRF B-scans, false HRFs per HRF-free B-scan and count error, after
    the last iteration reported: the cells both the cross-generator and the guards tables show."""
    last = seg[f"after_{seg['iterations_reported'][-1]}"]
    return (f"{_f(last['lesion_precision'], 2)} | {_f(last['lesion_recall'], 2)} | {_f(last['lesion_f1'], 2)} "
            f"| {_f(last['dice_gt_positive'], 2)} | {_f(last['false_lesions_per_hrf_free_bscan'])} "
            f"| {_f(seg['volume_counts']['mean_abs_error'], 2)}")


# the loops the model card's tables were measured with: "card" is the one of the first cross-generator
# and paper tables (before the retina band existed, so it is off); "default" is today's default
# loop; "recall" adds three peaks per iteration and a stop score of 0.01
LOOPS = {
    "card": PipelineParams(score_drop_guard=True, retina_band=False),
    "default": PipelineParams(),
    "recall": PipelineParams(peaks_per_iteration=3, stop_score=0.01),
}


def _segmentation(study: Path, clf: Classifier, args: argparse.Namespace, params: PipelineParams) -> dict[str, Any]:
    seg = make_segmenter(args.segmenter, device=args.device)
    t0 = time.perf_counter()
    out = evaluate_segmentation(study, clf, seg, params, limit_volumes=args.limit_volumes)
    out["wall_s"] = time.perf_counter() - t0
    return out


def table(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """AUROC, AP, ECE, lesion P/R/F1, Dice, false HRFs and count error: every model on every study."""
    rows, results = [], {}
    rows += _header("| model (trained on) | test study | AUROC | AP | ECE | F1 @ threshold | lesion P | lesion R "
                    "| lesion F1 | Dice (HRF B-scans) | false HRFs per HRF-free B-scan | mean per-volume count error |")
    data = {name: load_study_labels(path) for name, path in _pairs(args.study)}
    for mname, mdir in _pairs(args.model):
        clf = load_classifier(str(mdir), args.device)
        for sname, sdir in _pairs(args.study):
            cls = evaluate_classifier(clf, data[sname])
            seg = _segmentation(sdir, clf, args, LOOPS[args.loop])
            results[f"{mname}|{sname}"] = {"classification": cls, "segmentation": seg}
            rows.append(f"| {mname} ({clf.model_id}) | {sname} | {_f(cls['auroc'])} | {_f(cls['ap'])} | {_f(cls['ece'])} "
                        f"| {_f(cls['f1'])} @ {_f(cls['threshold'], 2)} | {_lesion_cells(seg)} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows), results


GUARD_CONFIGS: dict[str, dict[str, Any]] = {
    "retina band + lesion filter (the default)": {},
    "lesion filter only (retina band off)": {"retina_band": False},
    "retina band only (lesion filter off)": {"lesion_filter": None},
    "neither (the paper's loop)": {"retina_band": False, "lesion_filter": None},
    "default + score-drop guard": {"score_drop_guard": True},
    "default, 3 peaks per iteration": {"peaks_per_iteration": 3},
    "default, 3 peaks per iteration, stop score 0.01 (the recall loop)": {"peaks_per_iteration": 3, "stop_score": 0.01},
}


def guards(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Each guard on and off on the same study with the same model."""
    (mname, mdir), (sname, sdir) = _pairs(args.model)[0], _pairs(args.study)[0]
    clf = load_classifier(str(mdir), args.device)
    rows = [f"Model {mname} ({clf.model_id}), study {sname}.", "",
            *_header("| loop | lesion P | lesion R | lesion F1 | Dice (HRF B-scans) | false HRFs per HRF-free B-scan "
                     "| mean per-volume count error | lesion R, B-scans with > 6 HRFs | pipeline s |")]
    results: dict[str, Any] = {}
    for name, change in GUARD_CONFIGS.items():
        seg = _segmentation(sdir, clf, args, dataclasses.replace(PipelineParams(), **change))
        last = seg[f"after_{seg['iterations_reported'][-1]}"]
        results[name] = seg
        rows.append(f"| {name} | {_lesion_cells(seg)} | {_f(last['lesion_recall_heavy'], 2)} "
                    f"(n={last['n_heavy_bscans']}) | {_f(sum(seg['pipeline_seconds'].values()), 0)} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows), results


def paper(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The paper's findings on one study: CCT vs MIL (AUROC, AP); prompting vs the global relevance
    threshold (Dice on the same held-out HRF B-scans); lesion recall after 1 and after 6 iterations."""
    (sname, sdir) = _pairs(args.study)[0]
    data = load_study_labels(sdir)
    rows = [f"Study {sname}.", "", *_header("| model | AUROC | AP | Dice: global relevance threshold "
                                            "| Dice: prompting, 6 iterations | lesion R after 1 iteration "
                                            "| lesion R after 6 iterations |")]
    results: dict[str, Any] = {}
    for mname, mdir in _pairs(args.model):
        clf = load_classifier(str(mdir), args.device)
        cls = evaluate_classifier(clf, data)
        seg = _segmentation(sdir, clf, args, LOOPS[args.loop])
        base = seg["baselines"]
        results[mname] = {"classification": cls, "segmentation": seg}
        rows.append(f"| {mname} ({clf.model_id}) | {_f(cls['auroc'])} | {_f(cls['ap'])} | {_f(base['global_dice'], 2)} "
                    f"| {_f(base['pipeline_dice'].get('after_6'), 2)} | {_f(seg['after_1']['lesion_recall'], 2)} "
                    f"| {_f(seg['after_6']['lesion_recall'], 2)} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("table", "guards", "paper"))
    parser.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR (repeat)")
    parser.add_argument("--study", action="append", required=True, help="NAME=STUDY_DIR with ground truth (repeat)")
    parser.add_argument("--segmenter", default="region", choices=("region", "sam2", "auto"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit-volumes", type=int)
    parser.add_argument("--loop", choices=sorted(LOOPS), default="card",
                        help="the pipeline settings of the table and paper subcommands (default: card)")
    parser.add_argument("--json", type=Path, help="write the full results here")
    args = parser.parse_args()
    text, results = {"table": table, "guards": guards, "paper": paper}[args.what](args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
