"""Thin Click layer: parse arguments, call one library function, map HrfBatchError to a clean exit."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from hrf_batch import __version__
from hrf_batch.errors import HrfBatchError

if TYPE_CHECKING:
    from hrf_batch.config import Settings
    from hrf_batch.io.labels import LabelledBScans


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line messages and exit code 1 instead of tracebacks."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except HrfBatchError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hrf-batch")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML settings file (default: ./hrf-batch.toml if present).")
@click.pass_context
def main(ctx: click.Context, verbose: int, config_file: Path | None) -> None:
    """Count and outline hyper-reflective foci (HRF) in OCT studies.

    Reads HEYEX .vol/.e2e/XML, DICOM OCT and Topcon .fds exports, finds HRFs with a weakly
    supervised classifier, relevance maps and SAM 2, and stores counts and masks in a database.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"config_file": config_file}


def _settings(ctx: click.Context, **flags: Any) -> Settings:
    from hrf_batch.config import load_settings

    return load_settings(flags, ctx.obj.get("config_file") if ctx.obj else None)


def _layer_text(layers: dict[str, Any] | None) -> str:
    if layers is None:
        return "none in the file (estimated from the pixels when ingested)"
    return f"{', '.join(layers['names'])} ({layers['source']})"


def _format_info(summary: dict[str, Any]) -> str:
    sp = summary["spacing"]
    lines = [
        f"source      {summary['source_path']}  [{summary['source_format']}]",
        f"series      {summary['series_uid']}",
        f"patient     {summary['patient_id'] or '(none)'}   eye {summary['eye']}",
        f"visit       {summary['visit_date']}   acquired {summary['acquired_at']}",
        f"device      {summary['device']}",
        f"pattern     {summary['scan_pattern']}",
        f"shape       {summary['n_bscans']} B-scans x {summary['bscan_height']} x {summary['bscan_width']} px",
        f"spacing     lateral {sp['lateral_mm']:.5f} mm, axial {sp['axial_mm']:.5f} mm, "
        f"between B-scans {sp['between_bscans_mm']:.5f} mm",
        f"intensity   {summary['intensity_min']:.1f} .. {summary['intensity_max']:.1f} (display scale 0..255)",
        f"localizer   {summary['localizer_shape'] or 'none'}",
        f"layers      {_layer_text(summary['layer_lines'])}",
        f"sha256      {summary['source_sha256']}",
    ]
    if "birth_date" in summary:
        lines.insert(3, f"identity    {summary['patient_name'] or '(no name)'}, born {summary['birth_date']}")
    pos = summary["positions"]
    if pos:
        lines.append("positions   B-scan start -> end on the localizer (x, y mm)")
        for i, p in enumerate(pos):
            if len(pos) > 6 and 2 < i < len(pos) - 3:
                if i == 3:
                    lines.append(f"            ... {len(pos) - 6} more")
                continue
            s, e = p["start_mm"], p["end_mm"]
            lines.append(f"  {i:4d}      ({s[0]:.3f}, {s[1]:.3f}) -> ({e[0]:.3f}, {e[1]:.3f})")
    else:
        lines.append("positions   not recorded in the file")
    return "\n".join(lines)


def _guard_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The loop's guards and the model's precision as flags (default: the settings', i.e. guards on,
    one peak per iteration, precision auto)."""
    func = click.option("--retina-band/--no-retina-band", default=None,
                        help="Prompt and keep lesions only between the ILM and Bruch's membrane (default on).")(func)
    func = click.option("--peaks-per-iteration", type=click.IntRange(1, 20),
                        help="Separated relevance peaks prompted per iteration (default 1, the paper's loop).")(func)
    func = click.option("--lesion-filter/--no-lesion-filter", default=None,
                        help="Keep only lesions of HRF size, compact filled shape and contrast (default on).")(func)
    func = click.option("--score-drop-guard/--no-score-drop-guard", default=None,
                        help="Stop a B-scan when inpainting what was found does not lower its score (default off).")(func)
    func = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
                        help="Model arithmetic: bf16 (autocast; LRP checked for conservation) or fp32 "
                        "(default auto: bf16 on CUDA, fp32 on CPU).")(func)
    return func


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--show-identifiers", is_flag=True, help="Also print patient name and birth date.")
@_friendly
def info(path: Path, as_json: bool, show_identifiers: bool) -> None:
    """Print what was read from one OCT file: shape, spacing, eye, patient, dates, positions."""
    from hrf_batch.io.discover import display_text
    from hrf_batch.io.readers import read_volumes
    from hrf_batch.io.volume import volume_summary

    summaries = [volume_summary(v, show_identifiers=show_identifiers) for v in read_volumes(path)]
    for summary in summaries:  # the path as the database stores it, also for a name that is not UTF-8
        summary["source_path"] = display_text(summary["source_path"])
    if as_json:
        click.echo(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=2))
        return
    click.echo("\n\n".join(_format_info(s) for s in summaries))


@main.command()
@click.argument("study_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_friendly
def scan(study_dir: Path, as_json: bool) -> None:
    """List the OCT volumes in a study folder by patient, visit and eye, and every file left out."""
    from hrf_batch.io.study import scan_study

    report = scan_study(study_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for visit in report["visits"]:
        click.echo(f"{visit['patient_id'] or '(no id)'}  {visit['visit_date']}  {visit['eye']}")
        for vol in visit["volumes"]:
            click.echo(f"    {vol['n_bscans']:3d} x {vol['bscan_height']}x{vol['bscan_width']}  {vol['source_format']:10s} {vol['source_path']}")
    for issue in report["issues"]:
        click.echo(f"{issue['kind']:8s} {issue['reason']}")
    click.echo(f"{report['n_volumes']} volumes, {report['n_errors']} unreadable, {report['n_skipped']} skipped")


def _parse_widths(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """``--widths 512,768``: a comma list of whole numbers 32..2048 (empty: use --width)."""
    if value is None or not value.strip():
        return ()
    widths = []
    for part in value.split(","):
        try:
            w = int(part.strip())
        except ValueError as exc:
            raise click.BadParameter(f"{part.strip()!r} is not a whole number; give widths like 512,768,1024") from exc
        if not 32 <= w <= 2048:
            raise click.BadParameter(f"width {w} is outside 32..2048 pixels")
        widths.append(w)
    return tuple(widths)


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--patients", default=3, show_default=True, type=click.IntRange(1, 999), help="Number of patients.")
@click.option("--visits", default=2, show_default=True, type=click.IntRange(1, 50), help="Visits per patient.")
@click.option("--bscans", default=9, show_default=True, type=click.IntRange(1, 256), help="B-scans per volume.")
@click.option("--width", default=512, show_default=True, type=click.IntRange(32, 2048), help="A-scans per B-scan.")
@click.option("--height", default=496, show_default=True, type=click.IntRange(32, 2048), help="Pixels per A-scan.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same study).")
@click.option("--generator", type=click.Choice(["a", "b", "c"]), default="a", show_default=True,
              help="B-scan generator: a, b (independent look, wide randomisation; 256..1536 x 256..1024 px), or c "
                   "(held out: a third independent look for evaluation only; width >= 192, height >= 240 px).")
@click.option("--widths", callback=_parse_widths, metavar="W1,W2,...",
              help="B-scan widths each visit draws from, e.g. 512,768,1024,1536 (instead of --width).")
@_friendly
def synth(out_dir: Path, patients: int, visits: int, bscans: int, width: int, height: int, seed: int, generator: str,
          widths: tuple[int, ...]) -> None:
    """Write a synthetic study (both eyes, every supported format) with HRF ground truth beside it."""
    from hrf_batch.synthetic.study import StudySpec, write_synthetic_study

    try:
        spec = StudySpec(patients=patients, visits=visits, bscans=bscans, width=width, height=height, seed=seed,
                         generator=generator, widths=widths)
    except ValueError as exc:  # sizes generator b or c cannot lay out
        raise click.UsageError(str(exc)) from exc
    manifest = write_synthetic_study(out_dir, spec)
    click.echo(
        f"wrote {len(manifest)} volumes for {patients} patients to {out_dir} "
        f"(ground truth in {out_dir / 'ground_truth'})"
    )


def _labelled(study_dir: Path, labels: Path | None) -> LabelledBScans:
    from hrf_batch.io.labels import load_csv_labels, load_study_labels

    return load_csv_labels(labels, study_dir) if labels else load_study_labels(study_dir)


@main.command()
@click.argument("study_dirs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False), help="Model folder to write.")
@click.option("--labels", type=click.Path(path_type=Path, dir_okay=False), help="CSV: file, bscan_index, count|label[, eye]. Default: the study's ground_truth/manifest.csv.")
@click.option("--preset", default="cct-small", show_default=True, help="Architecture preset (see `hrf-batch models --presets`).")
@click.option("--task", type=click.Choice(["binary", "3class", "regression"]), default="binary", show_default=True, help="Head: HRF yes/no, 0/1/>1 HRF, or HRF count.")
@click.option("--steps", default=600, show_default=True, type=click.IntRange(1), help="Optimizer steps.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="B-scans per step.")
@click.option("--max-lr", default=1e-3, show_default=True, type=float, help="OneCycle peak learning rate.")
@click.option("--eval-every", default=100, show_default=True, type=click.IntRange(1), help="Validate every N steps.")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0.05, 0.5), help="Share of patients held out.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed for the split, init and batches.")
@click.option("--device", help="cpu, cuda or auto (default: HRF_BATCH_DEVICE, else auto).")
@click.option("--alexnet-weights", type=click.Path(path_type=Path, dir_okay=False), help="Local ImageNet AlexNet weights for MIL presets.")
@click.option("--resume", is_flag=True, help="Continue from OUT/train_state.pt.")
@click.option("--stream", is_flag=True, help="Read B-scans from their files as training needs them (memory does not grow "
              "with the study; same model as without). Default: load all first.")
@click.option("--cache-mb", default=256, show_default=True, type=click.IntRange(1), help="With --stream: decoded volumes kept in memory.")
@click.option("--loader-workers", default=0, show_default=True, type=click.IntRange(0, 64), help="Processes reading batches ahead.")
@click.pass_context
@_friendly
def train(ctx: click.Context, study_dirs: tuple[Path, ...], out_dir: Path, labels: Path | None, preset: str, task: str,
          steps: int, batch_size: int, max_lr: float, eval_every: int, val_fraction: float, seed: int,
          device: str | None, alexnet_weights: Path | None, resume: bool, stream: bool, cache_mb: int,
          loader_workers: int) -> None:
    """Train a B-scan classifier from image-level labels of one or more studies (patients kept
    apart per study); the best model by validation AUROC is kept and its scores calibrated.

    On several GPUs (or CPU processes): torchrun --nproc_per_node N -m hrf_batch train ...
    (--batch-size B-scans per process; only process 0 writes OUT)."""
    from hrf_batch.io.labels import combine
    from hrf_batch.training.stream import combine_streams, stream_labels
    from hrf_batch.training.train import TrainConfig, train_model

    if labels is not None and len(study_dirs) > 1:
        raise click.UsageError("--labels describes one study; train on one study with it, or drop --labels to use "
                               "each study's ground truth")
    settings = _settings(ctx, device=device)
    if stream:
        data = combine_streams([(d.resolve().name, stream_labels(d, labels, cache_mb * 2**20)) for d in study_dirs])
    else:
        data = combine([(d.resolve().name, _labelled(d, labels)) for d in study_dirs])
    cfg = TrainConfig(preset=preset, task=task, steps=steps, batch_size=batch_size, max_lr=max_lr, eval_every=eval_every,
                      val_fraction=val_fraction, seed=seed, device=settings.device,
                      alexnet_weights=str(alexnet_weights) if alexnet_weights else None,
                      takeoff_steps=min(300, steps // 2))
    info = train_model(data, cfg, out_dir, source=", ".join(str(d) for d in study_dirs), resume=resume,
                       workers=loader_workers)
    if info is None:  # another process of a torchrun launch: process 0 reports
        return
    m = info.config.metrics
    def num(key: str) -> str:
        return f"{m[key]:.3f}" if isinstance(m.get(key), (int, float)) else "undefined"

    click.echo(f"saved {info.model_id} to {out_dir}: validation AUROC {num('auroc')}, AP {num('ap')}, "
               f"F1 {num('f1')} at threshold {num('threshold')}")


@main.command()
@click.argument("study_dir", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--model", help="Model folder (default: the shipped model).")
@click.option("--labels", type=click.Path(path_type=Path, dir_okay=False), help="CSV labels instead of the study's ground truth (classification only).")
@click.option("--reviewed", is_flag=True, help="Instead of a study: the stored runs against the graders' verdicts in --db, "
              "and the graders against each other.")
@click.option("--db", help="With --reviewed: database URL or SQLite file (default: HRF_BATCH_DB, else ./hrf_batch.sqlite).")
@click.option("--grader", help="With --reviewed: only this grader (and the pairs they belong to).")
@click.option("--device", help="cpu, cuda or auto.")
@click.option("--segmentation", is_flag=True, help="Also run the pipeline and score its masks against the ground-truth masks.")
@click.option("--anatomy", is_flag=True, help="Also score layer lines, fovea, ETDRS counts and the retina band against the study's anatomy truth.")
@click.option("--val-study", type=click.Path(path_type=Path, file_okay=False), help="Study to calibrate the global-threshold baseline on (default: half of the patients).")
@click.option("--segmenter", type=click.Choice(["auto", "sam2", "region"]), help="Segmenter for --segmentation.")
@click.option("--sam2-checkpoint", help="SAM 2.1 checkpoint file (.pt).")
@click.option("--max-iterations", type=click.IntRange(1, 50), help="Pipeline iterations (default 6).")
@click.option("--stop-score", type=click.FloatRange(0, 1), help="Stop a B-scan when its score falls below this (default 0.05).")
@click.option("--limit-volumes", type=click.IntRange(1), help="Evaluate at most N volumes (quick runs).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_guard_options
@click.pass_context
@_friendly
def evaluate(ctx: click.Context, study_dir: Path | None, model: str | None, labels: Path | None, reviewed: bool,
             db: str | None, grader: str | None, device: str | None, segmentation: bool, anatomy: bool,
             val_study: Path | None, segmenter: str | None, sam2_checkpoint: str | None,
             max_iterations: int | None, stop_score: float | None, limit_volumes: int | None, as_json: bool,
             score_drop_guard: bool | None, lesion_filter: bool | None, peaks_per_iteration: int | None,
             retina_band: bool | None, precision: str | None) -> None:
    """Score a labelled study with a model: AUROC, AP and F1 for HRF presence; with --segmentation
    also Dice, pixel recall/precision and lesion F1 after 1 and N iterations, the global- and
    oracle-threshold baselines, and the pointing game. With --reviewed (no STUDY_DIR): B-scan sensitivity and
    specificity, lesion precision/recall and count agreement of the stored runs against each grader."""
    if reviewed or study_dir is None or db is not None or grader is not None:
        _reviewed_report(ctx, study_dir, reviewed, db, grader, as_json, segmentation or anatomy or labels is not None)
        return
    from hrf_batch.evaluation.classification import evaluate_classifier, format_metrics
    from hrf_batch.model.classify import load_classifier

    settings = _settings(ctx, model=model, device=device, segmenter=segmenter, sam2_checkpoint=sam2_checkpoint,
                         max_iterations=max_iterations, stop_score=stop_score, score_drop_guard=score_drop_guard,
                         lesion_filter=lesion_filter, peaks_per_iteration=peaks_per_iteration,
                         retina_band=retina_band, precision=precision)
    clf = load_classifier(settings.model, settings.device, settings.batch_size, settings.precision)
    metrics = evaluate_classifier(clf, _labelled(study_dir, labels))
    report: dict[str, Any] = {"classification": metrics}
    if segmentation:
        report.update(_segmentation_report(settings, clf, study_dir, val_study, limit_volumes))
    if anatomy:
        report["anatomy"] = _anatomy_report(settings, clf, study_dir, limit_volumes)
    if as_json:
        click.echo(json.dumps(report if segmentation or anatomy else metrics, indent=2, default=str))
        return
    click.echo(format_metrics(metrics))
    if segmentation:
        from hrf_batch.evaluation.segmentation import format_segmentation

        pg = report["pointing_game"]
        click.echo("\n" + format_segmentation(report["segmentation"]))
        click.echo(f"pointing game: relevance peak within {pg['tolerance_px']:.0f} px of an HRF in {pg['hits']} of "
                   f"{pg['n_bscans']} HRF-positive B-scans ({pg['fraction']:.2f}; chance {pg['chance']:.3f})")
    if anatomy:
        from hrf_batch.evaluation.anatomy import format_anatomy

        click.echo("\n" + format_anatomy(report["anatomy"]))


def _reviewed_report(ctx: click.Context, study_dir: Path | None, reviewed: bool, db: str | None, grader: str | None,
                     as_json: bool, study_options: bool) -> None:
    if not reviewed and study_dir is None:
        raise click.UsageError("give STUDY_DIR to score a labelled study, or --reviewed to score the stored runs against "
                               "the graders' verdicts")
    if not reviewed:
        raise click.UsageError("--db and --grader go with --reviewed (the graders' verdicts in the database)")
    if study_dir is not None or study_options:
        raise click.UsageError("--reviewed reads the graders' verdicts from the database (--db); drop STUDY_DIR, "
                               "--labels, --segmentation and --anatomy")
    from hrf_batch.review.agreement import format_reviewed, reviewed_figures
    from hrf_batch.store import open_store

    with open_store(_settings(ctx, db=db).db) as store:
        figures = reviewed_figures(store, grader)
    click.echo(json.dumps(figures, indent=2, default=str) if as_json else format_reviewed(figures))


def _segmentation_report(settings: Settings, clf: Any, study_dir: Path, val_study: Path | None,
                         limit_volumes: int | None) -> dict[str, Any]:
    from hrf_batch.evaluation.segmentation import evaluate_segmentation
    from hrf_batch.pipeline import PipelineParams
    from hrf_batch.segment import make_segmenter

    seg = make_segmenter(settings.segmenter, sam2_checkpoint=settings.sam2_checkpoint, sam2_size=settings.sam2_size,
                         device=settings.device)
    metrics = evaluate_segmentation(study_dir, clf, seg, PipelineParams.from_settings(settings), val_study=val_study,
                                    limit_volumes=limit_volumes, progress=True)
    return {"pointing_game": metrics.pop("pointing_game"), "segmentation": metrics}


def _anatomy_report(settings: Settings, clf: Any, study_dir: Path, limit_volumes: int | None) -> dict[str, Any]:
    from hrf_batch.evaluation.anatomy import evaluate_anatomy
    from hrf_batch.pipeline import PipelineParams
    from hrf_batch.segment import make_segmenter

    seg = make_segmenter(settings.segmenter, sam2_checkpoint=settings.sam2_checkpoint, sam2_size=settings.sam2_size,
                         device=settings.device)
    return evaluate_anatomy(study_dir, clf, seg, PipelineParams.from_settings(settings), limit_volumes=limit_volumes,
                            progress=True)


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from exc


@main.command()
@click.argument("study_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--segmenter", type=click.Choice(["auto", "sam2", "region"]), help="Segmenter to calibrate.")
@click.option("--sam2-checkpoint", help="SAM 2.1 checkpoint file (.pt).")
@click.option("--device", help="cpu, cuda or auto.")
@click.option("--boxes", default="2,4,6,8", show_default=True, help="Box sizes in px, comma-separated.")
@click.option("--crops", default="50,75,100", show_default=True, help="Crop sizes in px (50..100), comma-separated.")
@click.option("--limit-hrfs", default=300, show_default=True, type=click.IntRange(1), help="HRFs sampled from the study.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
@_friendly
def calibrate(ctx: click.Context, study_dir: Path, segmenter: str | None, sam2_checkpoint: str | None, device: str | None,
              boxes: str, crops: str, limit_hrfs: int, as_json: bool) -> None:
    """Grid search over box and crop sizes, prompting at ground-truth HRF centres; prints Dice per setting."""
    from hrf_batch.evaluation.calibrate import calibrate as run_calibration
    from hrf_batch.evaluation.calibrate import format_calibration
    from hrf_batch.segment import make_segmenter

    settings = _settings(ctx, segmenter=segmenter, sam2_checkpoint=sam2_checkpoint, device=device)
    seg = make_segmenter(settings.segmenter, sam2_checkpoint=settings.sam2_checkpoint, sam2_size=settings.sam2_size,
                         device=settings.device)
    rows = run_calibration(study_dir, seg, box_sizes=_int_list(boxes), crop_sizes=_int_list(crops), limit_hrfs=limit_hrfs)
    click.echo(json.dumps(rows, indent=2) if as_json else format_calibration(rows))


EXIT_PARTIAL = 3


@main.command()
@click.argument("study_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--db", help="Database URL or SQLite file (default: HRF_BATCH_DB, else ./hrf_batch.sqlite).")
@click.option("--model", help="Model folder (default: the shipped model).")
@click.option("--device", help="cpu, cuda or auto (default auto: CUDA when available).")
@click.option("--segmenter", type=click.Choice(["auto", "sam2", "region"]), help="auto: SAM 2 when its checkpoint is found, else region growing.")
@click.option("--sam2-checkpoint", help="SAM 2.1 checkpoint file (.pt).")
@click.option("--sam2-size", type=click.Choice(["tiny", "small", "base_plus", "large"]), help="SAM 2.1 model size.")
@click.option("--batch-size", type=click.IntRange(1), help="B-scans per forward pass (default: fitted to free memory on "
              "CUDA, 2 on CPU).")
@click.option("--max-iterations", type=click.IntRange(1, 50), help="Segment-and-inpaint iterations per B-scan (default 6).")
@click.option("--stop-score", type=click.FloatRange(0, 1), help="Stop a B-scan when its score falls below this (default 0.05).")
@click.option("--threshold", type=click.FloatRange(0, 1), help="Decision threshold (default: the model's own).")
@click.option("--crop-px", type=click.IntRange(50, 100), help="Crop size around the relevance peak (default 75).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--workers", type=click.IntRange(1, 64),
              help="Worker processes computing files at once on this machine (default 1); with --ray, Ray actors "
              "(default: one per GPU on CUDA, else one per CPU of the cluster).")
@click.option("--devices", help="CUDA devices for the workers, comma-separated (e.g. 0,1): worker i uses cuda:<i-th, "
              "round robin>. Default: every worker uses --device.")
@click.option("--ray", "ray_address", metavar="ADDRESS|auto|local",
              help="Compute on a Ray cluster: HOST:PORT, auto (the cluster `ray start` made here) or local (a private "
              "one on this machine). Several machines need a PostgreSQL --db.")
@_guard_options
@click.pass_context
@_friendly
def ingest(ctx: click.Context, study_dir: Path, quiet: bool, workers: int | None, devices: str | None,
           ray_address: str | None, **flags: Any) -> None:
    """Find every OCT volume in STUDY_DIR, segment its HRFs and store them in the study database.

    One transaction per volume; volumes already processed with the same model, segmenter and
    parameters are skipped, so an interrupted run resumes, and several ingests on one database
    split the volumes between them. Exit code 0: everything readable was
    processed; 3: some files or volumes failed (recorded in the database, the rest stored);
    1: nothing could be done (bad settings, missing model, database unreachable).

    --workers N computes N files at once in N processes on this machine (one progress bar, one summary);
    a worker that dies fails only the file it held, which the next ingest computes.
    --ray spreads the files over the actors of a Ray cluster; a file whose actor dies is handed to another.
    """
    import dataclasses

    from hrf_batch.ingest import ingest_study
    from hrf_batch.workers import ingest_study_workers, parse_devices, worker_device

    settings = _settings(ctx, **flags)
    if ray_address is not None:
        from hrf_batch.cluster import ingest_study_ray

        if devices is not None:
            raise click.UsageError("--devices is for --workers on this machine; with --ray, Ray gives each actor a GPU")
        summary = ingest_study_ray(study_dir, settings, ray_address, workers=workers, progress=not quiet)
    elif (workers or 1) == 1:
        device = worker_device(settings, 0, parse_devices(devices) if devices is not None else None)
        summary = ingest_study(study_dir, dataclasses.replace(settings, device=device), progress=not quiet)
    else:
        device_list = parse_devices(devices) if devices is not None else None
        summary = ingest_study_workers(study_dir, settings, workers, devices=device_list, progress=not quiet)
    click.echo(summary.text())
    if summary.failed:
        ctx.exit(EXIT_PARTIAL)


@main.group()
def db() -> None:
    """Study database maintenance (schema migrations)."""


@db.command("upgrade")
@click.option("--db", "db_opt", help="Database URL or SQLite file (default: HRF_BATCH_DB, else ./hrf_batch.sqlite).")
@click.pass_context
@_friendly
def db_upgrade(ctx: click.Context, db_opt: str | None) -> None:
    """Migrate an existing study database to the schema this version needs (keeps all data)."""
    from hrf_batch.store import display_url, resolve_url, upgrade

    settings = _settings(ctx, db=db_opt)
    revision = upgrade(settings.db)
    click.echo(f"database {display_url(resolve_url(settings.db))} is at schema revision {revision}")


@main.group(invoke_without_command=True)
@click.option("--dir", "models_dir", type=click.Path(path_type=Path, file_okay=False), help="Folder of model folders (default: the models shipped inside the package).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.pass_context
@_friendly
def models(ctx: click.Context, models_dir: Path | None, as_json: bool) -> None:
    """List the classifier models with their ids and purpose, and whether SAM 2 is ready.

    `hrf-batch models fetch sam2` downloads (or installs a copy of) the SAM 2.1 weights.
    """
    if ctx.invoked_subcommand is not None:
        return
    from hrf_batch.config import MODELS_DIR
    from hrf_batch.model.catalog import list_models
    from hrf_batch.segment import sam2_status

    settings = _settings(ctx)
    found = list_models(models_dir or MODELS_DIR)
    sam2 = sam2_status(settings.sam2_checkpoint, settings.sam2_size)
    if as_json:
        click.echo(json.dumps({"models": found, "default_model": settings.model, "sam2": sam2}, indent=2))
        return
    for m in found:
        default = "  [default]" if Path(m["path"]).resolve() == Path(settings.model).resolve() else ""
        auroc = f"{m['val_auroc']:.3f}" if isinstance(m["val_auroc"], (int, float)) else "n/a"
        state = "" if m["intact"] else "  WEIGHTS CHANGED SINCE SAVING"
        click.echo(f"{m['model_id']}  {m['preset'] or ''} {m['task']}  val AUROC {auroc}{default}{state}\n    {m['path']}\n    {m['purpose']}")
    if not found:
        click.echo(f"no models found in {models_dir or MODELS_DIR}")
    click.echo(f"SAM 2 ({sam2['name']}): {'ready' if sam2['ready'] else 'not ready'} — {sam2['message']}")


@models.group("fetch")
def models_fetch() -> None:
    """Get model weights that cannot ship with hrf-batch."""


SAM2_SIZES = ("tiny", "small", "base_plus", "large")  # the keys of segment.weights.SAM2_MODELS (no import here: --help stays instant)


@models_fetch.command("sam2")
@click.option("--size", type=click.Choice(SAM2_SIZES, case_sensitive=False), help="Model size (default: the sam2_size setting, tiny).")
@click.option("--from", "src", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="Install this copy (fetched on another machine) instead of downloading.")
@click.option("--to", "to_dir", type=click.Path(path_type=Path, file_okay=False), help="Target folder (default: the sam2_checkpoint setting when it is a folder, else ~/.cache/hrf-batch/sam2).")
@click.option("--force", is_flag=True, help="Replace a different checkpoint already in the target folder (or download again).")
@click.pass_context
def models_fetch_sam2(ctx: click.Context, size: str | None, src: Path | None, to_dir: Path | None, force: bool) -> None:
    """Download the official SAM 2.1 checkpoint, or install a copy with --from FILE.

    The file is loaded as the chosen size and written under a temporary name in the target folder,
    then renamed to its official name, so a broken or wrong file is never installed. Without network,
    fetch the file on another machine and install it here with --from.
    """
    from hrf_batch.segment import sam2_spec, sam2_status
    from hrf_batch.segment.fetch import fetch, install, target_dir

    settings = _settings(ctx)
    try:
        spec = sam2_spec(size or settings.sam2_size)
        folder = to_dir or target_dir(settings.sam2_checkpoint)
        if src is None:
            click.echo(f"downloading {spec.url}\n  into {folder} (checked by loading it as {spec.name} before it is installed)", err=True)
            done = fetch(spec.size, folder, force=force)
        else:
            click.echo(f"checking that {src} loads as {spec.name} ...", err=True)
            done = install(src, spec.size, folder, force=force)
    except HrfBatchError as exc:  # the problem, then what to do, each on its own line
        raise click.ClickException(f"{exc.problem}\n{exc.hint}" if exc.hint else exc.problem) from exc
    said = {"installed": "installed", "replaced": "replaced the previous file with",
            "unchanged": "already installed (same sha256), nothing to do:",
            "present": "already installed, nothing downloaded (pass --force to download it again):"}
    click.echo(f"{spec.name} {said[done.action]} {done.path}\nsha256 {done.sha256}")
    status = sam2_status(settings.sam2_checkpoint, spec.size)
    if not (status["ready"] and Path(status["path"]).resolve() == done.path.resolve()):
        click.echo(f"note: hrf-batch looks for {spec.name} at {status['path']}, not here; point the sam2_checkpoint "
                   f"setting (or HRF_BATCH_SAM2_CHECKPOINT) at {done.path}")
    elif spec.size != settings.sam2_size:
        click.echo(f"SAM 2 ({spec.name}): ready; it is used with --sam2-size {spec.size} "
                   f"(the sam2_size setting is {settings.sam2_size})")
    else:
        click.echo(f"SAM 2 ({spec.name}): ready")


@main.command()
@click.option("--patient", required=True, help="Patient id as stored (e.g. P012).")
@click.option("--out", "out_dir", default="reports", show_default=True, type=click.Path(path_type=Path, file_okay=False), help="Folder for the PDF.")
@click.option("--db", help="Database URL or SQLite file (default: HRF_BATCH_DB, else ./hrf_batch.sqlite).")
@click.option("--show-identifiers", is_flag=True, help="Print patient name, birth date and file names in the report.")
@click.pass_context
@_friendly
def report(ctx: click.Context, patient: str, out_dir: Path, db: str | None, show_identifiers: bool) -> None:
    """Render a per-patient PDF: visits, HRF trend, en-face map, B-scan gallery and provenance."""
    from hrf_batch.report import render_patient_report
    from hrf_batch.store import open_store

    settings = _settings(ctx, db=db)
    with open_store(settings.db) as store:
        path = render_patient_report(store, patient, out_dir, show_identifiers=show_identifiers)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), help="Folder for the CSV files.")
@click.option("--dicom-seg", "dicom_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for a DICOM Segmentation per volume (and DICOM OCT of non-DICOM sources).")
@click.option("--nifti", "nifti_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for NIfTI image and HRF label volumes with a JSON provenance sidecar.")
@click.option("--patient", help="Only this patient (as stored) in the DICOM and NIfTI exports.")
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path, dir_okay=False),
              help="Training labels CSV from the graders' verdicts (reads as `hrf-batch train STUDY --labels FILE`).")
@click.option("--grader", help="With --labels: whose verdicts (needed when several graders reviewed).")
@click.option("--db", help="Database URL or SQLite file (default: HRF_BATCH_DB, else ./hrf_batch.sqlite).")
@click.option("--include-identifiers", is_flag=True, help="Also export names, birth dates and file paths.")
@click.pass_context
@_friendly
def export(ctx: click.Context, out_dir: Path | None, dicom_dir: Path | None, nifti_dir: Path | None, patient: str | None,
           labels_csv: Path | None, grader: str | None, db: str | None, include_identifiers: bool) -> None:
    """Write cohort CSVs (--out), DICOM SEG (--dicom-seg), NIfTI (--nifti) of the stored results, or the training
    labels the graders' verdicts give (--labels)."""
    if out_dir is None and dicom_dir is None and nifti_dir is None and labels_csv is None:
        raise click.UsageError("pass at least one output: --out, --dicom-seg, --nifti or --labels")
    if grader is not None and labels_csv is None:
        raise click.UsageError("--grader picks whose verdicts go into --labels FILE; add --labels")
    from hrf_batch.store import open_store

    settings = _settings(ctx, db=db)
    skipped: list[str] = []
    with open_store(settings.db) as store:
        if out_dir is not None:
            from hrf_batch.report import export_cohort

            paths = export_cohort(store, out_dir, include_identifiers=include_identifiers)
            click.echo("\n".join(f"wrote {p}" for p in paths))
        if labels_csv is not None:
            from hrf_batch.review.labels import export_labels

            click.echo(export_labels(store, labels_csv, grader=grader).text())
        for target, kind in ((dicom_dir, "dicom"), (nifti_dir, "nifti")):
            if target is not None:
                from hrf_batch.export import export_dicom, export_nifti

                summary = (export_dicom if kind == "dicom" else export_nifti)(
                    store, target, patient=patient, include_identifiers=include_identifiers)
                click.echo(summary.describe(target))
                skipped += summary.skipped
    for line in skipped:
        click.echo(f"not exported: {line}", err=True)
    if skipped:
        raise click.ClickException(f"{len(skipped)} volume export(s) left out (listed above)")


@main.command()
@click.option("--db", help="Database URL or SQLite file (default: HRF_BATCH_DB, else ./hrf_batch.sqlite).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but 127.0.0.1 lets other machines in (with the token).")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--grader", help="Your name or initials; verdicts are recorded under it. Without it the page is read-only.")
@click.option("--show-identifiers", is_flag=True, help="Show patient names, birth dates and file paths.")
@click.option("--no-browser", is_flag=True, help="Only print the address; do not open a browser.")
@click.pass_context
@_friendly
def review(ctx: click.Context, db: str | None, host: str, port: int, grader: str | None, show_identifiers: bool,
           no_browser: bool) -> None:
    """Serve the grader review page: accept or reject each HRF found, mark missed ones, say per B-scan HRF yes/no."""
    import webbrowser

    from hrf_batch.review.missed import SegmenterCache
    from hrf_batch.review.server import start
    from hrf_batch.store import open_store

    settings = _settings(ctx, db=db)
    with open_store(settings.db) as store:
        server = start(store, host=host, port=port, grader=grader, show_identifiers=show_identifiers,
                       segmenters=SegmenterCache(settings.sam2_checkpoint, settings.device))
        click.echo(server.banner())
        if not no_browser:
            webbrowser.open(server.url)
        server.run()
    click.echo("review page stopped")
