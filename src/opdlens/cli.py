"""The ``opdlens`` command line (typer)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from opdlens.policy import OpdlensError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Per-token diagnostics and training for on-policy distillation.")
console = Console(stderr=True)


def _fail(exc: BaseException) -> None:
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _report(run_dir: Path, extra: list[tuple[str, Path]] | None = None) -> Path:
    from opdlens.pipeline import load_results
    from opdlens.report import write_report
    from opdlens.store import RunStore

    nodes, questions, paths = load_results(RunStore(run_dir))
    return write_report(run_dir / "report", nodes, questions, paths, extra=extra)


def _run_diagnose(cfg, ray_address: Optional[str]) -> Path:  # type: ignore[no-untyped-def]
    from opdlens.pipeline import diagnose

    start = time.perf_counter()
    try:
        if ray_address is not None:
            from opdlens.distributed import diagnose_ray

            store = diagnose_ray(cfg, address=None if ray_address in ("", "local") else ray_address)
        else:
            store = diagnose(cfg)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished rollouts are kept in {cfg.out_dir}; rerun the same command to resume")
        raise typer.Exit(130) from None
    console.print(f"[green]done[/] in {time.perf_counter() - start:.0f}s; results in {store.root}")
    try:
        index = _report(store.root)
    except OpdlensError as exc:  # e.g. no valid node: the run is fine, the report has nothing to show
        console.print(f"[yellow]no report[/]: {exc}")
        return store.root
    console.print(f"report: {index}")
    console.print(f"summary: {index.parent / 'summary.md'}")
    return index


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="run directory (rerun to resume)"),
    questions: int = typer.Option(4, min=1, help="number of built-in arithmetic questions"),
) -> None:
    """The main job on the embedded default: SmolLM2-135M, built-in arithmetic, three self-distillation teachers."""
    from opdlens.config import demo_config

    try:
        cfg = demo_config(str(out), questions)
        console.print(f"diagnosing {cfg.student} on {questions} '{cfg.task}' questions with teachers "
                      f"{', '.join(t.name for t in cfg.teachers)} → {out}")
        _run_diagnose(cfg, None)
    except OpdlensError as exc:
        _fail(exc)


@app.command(name="diagnose")
def diagnose_cmd(
    config: Path = typer.Argument(..., help="YAML run config (see configs/)"),
    out: Optional[Path] = typer.Option(None, help="override out_dir"),
    ray: Optional[str] = typer.Option(
        None, help="run on Ray: 'local' (start a local cluster), 'auto' (the running cluster) or an address"
    ),
) -> None:
    """Phase 1 (rollouts, targeted enrichment) and phase 2 (teacher scoring), then the report."""
    from opdlens.config import DiagnoseConfig

    try:
        cfg = DiagnoseConfig.from_yaml(config)
        if out is not None:
            cfg = cfg.model_copy(update={"out_dir": str(out)})
        _run_diagnose(cfg, ray)
    except OpdlensError as exc:
        _fail(exc)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run directory written by diagnose/demo"),
    train_run: list[Path] = typer.Option([], "--train", help="OPD run directory whose curve to include (repeatable)"),
) -> None:
    """(Re)build the report of a run: summary.md, CSVs, figures, index.html (+ OPD training curves)."""
    try:
        extra = []
        for d in train_run:
            png = d / "rkl_curve.png"
            if not png.is_file():
                raise OpdlensError(f"{d} has no rkl_curve.png: run `opdlens train` (or python -m opdlens.opd.demo) there first")
            extra.append((f"OPD training: {d.name}", png))
        index = _report(run_dir, extra)
    except OpdlensError as exc:
        _fail(exc)
    console.print(f"report: {index}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories written by diagnose/demo (one setting each)"),
    out: Path = typer.Option(Path("runs/compare"), help="folder for the study's CSVs, figures and summary.md"),
    metric: str = typer.Option("align_gkd", help="alignment column: align_gkd, align_single, align_minillm, align_drgrpo"),
    bins: str = typer.Option("0.2,0.5,0.8", help="inner edges of the difficulty bins (student success rate)"),
    incontext: bool = typer.Option(
        False, "--incontext", help="first sample the student under each self-teacher context of each run "
        "(stored in the run directory, resumable) and add the in-context accuracy table"),
    samples: int = typer.Option(32, "--incontext-samples", min=1, help="completions per question and context"),
    device: Optional[str] = typer.Option(None, help="device of the --incontext sampling (default: each run's)"),
) -> None:
    """The study across runs: Table 1 (teachers x settings, correct/incorrect paths), p-values, difficulty
    bins, best teacher per bin, and with --incontext the student's accuracy under each self-teacher context."""
    from opdlens.compare import compare_runs, parse_edges, write_study
    from opdlens.incontext import run_incontext

    try:
        edges = parse_edges(bins)
        study = compare_runs(runs, metric, edges)  # checks the runs before any sampling
        if incontext:
            for run_dir in runs:
                console.print(f"in-context accuracy: {run_dir}")
                run_incontext(run_dir, samples, device=device)
            study = compare_runs(runs, metric, edges)
        summary = write_study(study, out)
    except OpdlensError as exc:
        _fail(exc)
    console.print(f"study: {summary}")


@app.command()
def train(config: Path = typer.Argument(..., help="YAML training config")) -> None:
    """On-policy distillation training (see opdlens.opd)."""
    from opdlens.opd.cli import train_cmd

    try:
        train_cmd(config)
    except OpdlensError as exc:
        _fail(exc)


@app.command()
def tasks() -> None:
    """List the registered tasks."""
    from opdlens.tasks import list_tasks

    for name in list_tasks():
        typer.echo(name)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
