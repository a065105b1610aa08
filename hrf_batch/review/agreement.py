"""How the tool agrees with the graders, and the graders with each other (`hrf-batch evaluate --reviewed`).

Each grader's truth per B-scan is the `hrf_review_bscans` view's (migration 0005: finished B-scans
only, a "no" wins over lesion verdicts, the count is accepted + added lesions). Against it:

* B-scans: the tool is positive when its run found >= 1 lesion; sensitivity = tp / (tp + fn),
  specificity = tn / (tn + fp) against the grader's HRF yes/no.
* Lesions, pooled over the B-scans as `evaluate --segmentation` pools them: a model lesion the grader
  accepted is a true positive, one they rejected a false one, an added lesion a missed HRF:
  ``lesion_precision`` = accepted / judged, ``lesion_recall`` = accepted / (accepted + added), and
  ``false_lesions_per_hrf_free_bscan`` the tool's lesions per B-scan the grader called HRF-free.
  These are `evaluate --segmentation`'s figures when the grader judges a lesion as its ground-truth
  matching does (:func:`hrf_batch.evaluation.segmentation.lesion_match`) and each model lesion meets
  one true HRF; a lesion spanning two HRFs, or two lesions on one, is one verdict but two HRFs
  there (see ``scripts/grade_from_truth.py``).
* Counts, on the B-scans with a known grader count: per B-scan the mean |tool − grader|, the mean
  tool − grader (bias) and the share of equal counts; per volume (run) the figures of
  :func:`hrf_batch.evaluation.segmentation.volume_count_errors`, as `evaluate --segmentation` reports them.
* Grader against grader, on the B-scans both finished: Cohen's kappa on HRF yes/no, count agreement
  where both counts are known, and agreement on the model lesions both judged (a "no" rejects them all).

Figures pool every reviewed run in the database (each verdict judges the run it names); the models
of those runs are listed with them.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from hrf_batch.errors import LabelError
from hrf_batch.evaluation.segmentation import volume_count_errors
from hrf_batch.store import ReviewState, Store
from hrf_batch.store.read import ReviewBScan

NAN = float("nan")
_NO_REVIEW_HINT = "review B-scans first (`hrf-batch review`): a B-scan counts once it has a yes/no or every lesion judged"


def ratio(num: float, den: float) -> float:
    """num / den, NaN for an empty denominator (the figure is undefined, not zero)."""
    return float(num) / float(den) if den else NAN


def f1(precision: float, recall: float) -> float:
    """Harmonic mean, NaN when either is undefined (as the segmentation evaluation's lesion F1)."""
    if not (math.isfinite(precision) and math.isfinite(recall)):
        return NAN
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two raters' yes/no on the same items; NaN when undefined (no items, or both
    raters gave one and the same answer throughout, so chance agreement is 1)."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs the same items from both raters, got {len(a)} and {len(b)} answers")
    n = len(a)
    if n == 0:
        return NAN
    observed = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    chance = pa * pb + (1 - pa) * (1 - pb)
    return NAN if chance == 1 else (observed - chance) / (1 - chance)


def count_agreement(pairs: Sequence[tuple[int, int]]) -> dict[str, float]:
    """(first, second) counts per B-scan → mean |first − second|, mean first − second, share equal."""
    n = len(pairs)
    return {
        "n_counted": n,
        "mean_abs_count_error": ratio(sum(abs(x - y) for x, y in pairs), n),
        "count_bias": ratio(sum(x - y for x, y in pairs), n),
        "equal_count_share": ratio(sum(x == y for x, y in pairs), n),
    }


def tool_vs_grader(rows: Sequence[ReviewBScan]) -> dict[str, Any]:
    """The tool against one grader over their finished B-scans (rows of `hrf_review_bscans`)."""
    done = [r for r in rows if r.finished]
    graders = {r.grader for r in done}
    if len(graders) > 1:
        raise ValueError(f"tool_vs_grader compares one grader at a time, got {sorted(graders)}")
    pos = [r for r in done if r.grader_has_hrf]
    neg = [r for r in done if not r.grader_has_hrf]
    tp, fn = sum(r.tool_count > 0 for r in pos), sum(r.tool_count == 0 for r in pos)
    fp, tn = sum(r.tool_count > 0 for r in neg), sum(r.tool_count == 0 for r in neg)
    judged = sum(r.lesions_judged for r in done)
    confirmed = sum(r.lesions_confirmed for r in done)
    missed = sum(r.lesions_missed for r in done)
    precision, recall = ratio(confirmed, judged), ratio(confirmed, confirmed + missed)
    counted = [r for r in done if r.grader_count is not None]
    per_run: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r in counted:
        per_run[r.run_id][0] += r.tool_count
        per_run[r.run_id][1] += r.grader_count  # type: ignore[operator]
    return {
        "n_bscans": len(done), "n_runs": len({r.run_id for r in done}), "n_gt_positive": len(pos),
        "n_gt_negative": len(neg), "tp_bscans": tp, "fn_bscans": fn, "fp_bscans": fp, "tn_bscans": tn,
        "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
        "n_pred_lesions": judged, "n_tp_lesions": confirmed, "n_missed_hrfs": missed,
        "lesion_precision": precision, "lesion_recall": recall, "lesion_f1": f1(precision, recall),
        "false_lesions_per_hrf_free_bscan": ratio(sum(r.tool_count for r in neg), len(neg)),
        **count_agreement([(r.tool_count, r.grader_count) for r in counted]),  # type: ignore[misc]
        "volume_counts": volume_count_errors([tuple(v) for _, v in sorted(per_run.items())]),  # type: ignore[misc]
    }


def _lesion_calls(rows: Sequence[ReviewBScan], states: Sequence[ReviewState]) -> dict[tuple[str, int, int, int], bool]:
    """(grader, run, B-scan, lesion) → accepted, for the model lesions each grader judged on their
    finished B-scans; after a "no" every model lesion of the B-scan counts as rejected."""
    finished = {(r.grader, r.run_id, r.bscan_index): r for r in rows if r.finished}
    calls: dict[tuple[str, int, int, int], bool] = {}
    for state in states:
        for v in state.lesion_verdicts:
            if (v.grader, v.run_id, v.bscan_index) in finished:
                calls[(v.grader, v.run_id, v.bscan_index, v.lesion_index)] = v.verdict == "accept"
    for (grader, run_id, index), row in finished.items():
        if row.bscan_verdict is False:
            for lesion in range(row.tool_count):
                calls[(grader, run_id, index, lesion)] = False
    return calls


def grader_vs_grader(rows: Sequence[ReviewBScan], states: Sequence[ReviewState], first: str,
                     second: str) -> dict[str, Any]:
    """Two graders on the B-scans both finished: kappa on HRF yes/no, count and lesion-verdict agreement."""
    mine = {(r.run_id, r.bscan_index): r for r in rows if r.finished and r.grader == first}
    theirs = {(r.run_id, r.bscan_index): r for r in rows if r.finished and r.grader == second}
    both = sorted(mine.keys() & theirs.keys())
    yes_a = [bool(mine[k].grader_has_hrf) for k in both]
    yes_b = [bool(theirs[k].grader_has_hrf) for k in both]
    counts = [(mine[k].grader_count, theirs[k].grader_count) for k in both
              if mine[k].grader_count is not None and theirs[k].grader_count is not None]
    calls = _lesion_calls([*mine.values(), *theirs.values()], states)
    lesions = sorted({key[1:] for key in calls if key[0] == first and key[1:3] in set(both)}
                     & {key[1:] for key in calls if key[0] == second})
    calls_a = [calls[(first, *k)] for k in lesions]
    calls_b = [calls[(second, *k)] for k in lesions]
    return {
        "graders": [first, second], "n_bscans": len(both),
        "bscan_agreement": ratio(sum(x == y for x, y in zip(yes_a, yes_b)), len(both)),
        "bscan_kappa": cohen_kappa(yes_a, yes_b),
        **count_agreement(counts),  # type: ignore[arg-type]
        "n_lesions_both_judged": len(lesions),
        "lesion_agreement": ratio(sum(x == y for x, y in zip(calls_a, calls_b)), len(lesions)),
        "lesion_kappa": cohen_kappa(calls_a, calls_b),
    }


def reviewed_figures(store: Store, grader: str | None = None) -> dict[str, Any]:
    """Every figure of `evaluate --reviewed`: the tool against each grader (or only ``grader``), and each
    pair of graders that finished the same B-scans. LabelError when nothing is reviewed yet."""
    rows: list[ReviewBScan] = [r for r in store.view_rows("hrf_review_bscans") if r.finished]
    graders = sorted({r.grader for r in rows})
    if not rows:
        raise LabelError(f"no finished grader review in {store.url}", _NO_REVIEW_HINT)
    if grader is not None:
        grader = grader.strip()
        if grader not in graders:
            raise LabelError(f"grader {grader!r} finished no B-scan in {store.url}",
                             f"pick one of the graders who did: {', '.join(graders)}")
    states = store.reviewed_runs(masks=False)
    pairs = [(a, b) for a, b in itertools.combinations(graders, 2) if grader in (None, a, b)]
    versus = [grader_vs_grader(rows, states, a, b) for a, b in pairs]
    return {
        "database": store.url,
        "models": sorted({r.model_id for r in rows}),
        "tool_vs_grader": {g: tool_vs_grader([r for r in rows if r.grader == g])
                           for g in graders if grader in (None, g)},
        "grader_vs_grader": [v for v in versus if v["n_bscans"] > 0],
    }


def _f(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "–"


def format_reviewed(figures: dict[str, Any]) -> str:
    """Plain text of :func:`reviewed_figures`, one block per grader, then one line per pair of graders."""
    lines = [f"models      {', '.join(figures['models'])}", ""]
    for grader, m in figures["tool_vs_grader"].items():
        vc = m["volume_counts"]
        lines += [
            f"tool vs {grader}: {m['n_bscans']} B-scans of {m['n_runs']} run{'' if m['n_runs'] == 1 else 's'} ({m['n_gt_positive']} with HRF)",
            f"  B-scans   sensitivity {_f(m['sensitivity'])} ({m['tp_bscans']}/{m['tp_bscans'] + m['fn_bscans']}), "
            f"specificity {_f(m['specificity'])} ({m['tn_bscans']}/{m['tn_bscans'] + m['fp_bscans']})",
            f"  lesions   precision {_f(m['lesion_precision'])} ({m['n_tp_lesions']}/{m['n_pred_lesions']} judged), "
            f"recall {_f(m['lesion_recall'])} ({m['n_missed_hrfs']} added), F1 {_f(m['lesion_f1'])}, "
            f"false HRFs per HRF-free B-scan {_f(m['false_lesions_per_hrf_free_bscan'])}",
            f"  counts    per B-scan ({m['n_counted']}): mean |tool - grader| {_f(m['mean_abs_count_error'])}, "
            f"bias {_f(m['count_bias'])}, equal {_f(m['equal_count_share'])}; per volume ({vc['n_volumes']}): "
            f"mean |found - true| {_f(vc['mean_abs_error'])}, mean found - true {_f(vc['mean_error'])}",
        ]
    for v in figures["grader_vs_grader"]:
        a, b = v["graders"]
        lines.append(
            f"{a} vs {b}: {v['n_bscans']} B-scans, HRF yes/no agree {_f(v['bscan_agreement'])} (kappa "
            f"{_f(v['bscan_kappa'])}); counts ({v['n_counted']}) mean |{a} - {b}| {_f(v['mean_abs_count_error'])}, "
            f"equal {_f(v['equal_count_share'])}; lesion verdicts ({v['n_lesions_both_judged']}) agree "
            f"{_f(v['lesion_agreement'])} (kappa {_f(v['lesion_kappa'])})")
    return "\n".join(lines)
