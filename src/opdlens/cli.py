"""The ``opdlens`` command line (typer)."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from opdlens.display import display_text
from opdlens.errors import OpdlensError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Per-token diagnostics and training for on-policy distillation."
)
console = Console(stderr=True, soft_wrap=True)  # no line breaks inserted: printed paths stay whole (copyable)


#: Exit status of ``opdlens report`` when the run is unfinished (the report shows what is done).
EXIT_PARTIAL = 3
#: Exit status of a diagnose run that finished but whose report could not be built.
EXIT_NO_REPORT = 4


def _say(label: str, text: object) -> None:
    """Print ``label`` (rich markup) and ``text`` (data: ids, names, paths, messages quoting them),
    the text shown as written: no markup, no control or bidi character (:func:`display_text`)."""
    console.print(f"{label} {escape(display_text(text, newlines=True))}".lstrip())


def _fail(exc: OpdlensError | OSError) -> NoReturn:
    """One ``error:`` line and exit status 2; an ``OSError`` other than a full disk propagates."""
    if not isinstance(exc, OpdlensError):
        full = _disk_full(exc)
        if full is None:
            raise exc
        exc = full
    _say("[bold red]error:[/]", exc)
    raise typer.Exit(2)


def _disk_full(exc: OSError) -> OpdlensError | None:
    """The error to show for a write that failed because the disk (or the user's quota) is full."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in str(exc):
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return OpdlensError(
        f"the disk is full{where} ({exc.strerror or exc}): free some space (or choose another out_dir) and "
        "rerun the same command: it resumes from the finished work, which is kept"
    )


def _check_device(device: str) -> None:
    """Refuse a device this machine does not have before any model loads (a config may name a
    GPU the machine it was written on had)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OpdlensError(f"device {device!r}: CUDA is not available on this machine; use device: cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise OpdlensError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); choose one of them"
            )
    elif device == "mps" and not torch.backends.mps.is_available():
        raise OpdlensError("device 'mps': Apple's MPS backend is not available on this machine; use device: cpu")


def _version(value: bool) -> None:
    if value:
        from opdlens import __version__

        typer.echo(f"opdlens {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Per-token diagnostics and training for on-policy distillation."""


def _report(run_dir: Path, out: Path | None = None, extra: list[tuple[str, Path]] | None = None) -> tuple[Path, bool]:
    """Write the report of ``run_dir`` into ``out`` (default ``run_dir/report``); returns its
    ``index.html`` and whether the run is partial (unfinished)."""
    from opdlens.audit.run import report_line
    from opdlens.report import write_report
    from opdlens.report.run import load_run

    res = load_run(run_dir)  # with the run's own choices (statistical unit, readings of the paper)
    # files are never written through links (opdlens.io); nor are the run's own report folders followed
    folders = [out / "figures"] if out is not None else [run_dir / "report", run_dir / "report" / "figures"]
    out = out or run_dir / "report"
    for d in folders:
        if d.is_symlink():
            raise OpdlensError(
                f"report folder {d} is a symbolic link (to {os.readlink(d)}): opdlens does not write through "
                "links; remove it, or pass --out to write the report elsewhere"
            )
    audit = report_line(res.root)  # `opdlens audit`'s line, when the run has been audited
    index = write_report(
        out,
        res.nodes,
        res.questions,
        res.paths,
        extra=extra,
        skips=res.skips,
        inputs=res.inputs,
        notes=[*res.notes, *([audit] if audit else [])],
        unit=res.stat_unit,
        choices=res.choices,
    )
    if res.partial:
        for note in res.notes:
            _say("[yellow]partial:[/]", note)
    return index, res.partial


def _run_diagnose(cfg, ray_address: Optional[str], fresh: bool = False) -> Path:  # type: ignore[no-untyped-def]
    from opdlens.diagnose.run import diagnose

    start = time.perf_counter()
    if ray_address is None:
        _check_device(cfg.device)
    try:
        if ray_address is not None:
            from opdlens.diagnose.distributed import diagnose_ray

            if fresh:
                from opdlens.diagnose.store import start_fresh

                start_fresh(cfg.out_dir)
            store = diagnose_ray(cfg, address=None if ray_address in ("", "local") else ray_address)
        else:
            store = diagnose(cfg, fresh=fresh)
    except KeyboardInterrupt:
        _say(
            "[yellow]interrupted[/]:",
            f"finished rollouts are kept in {cfg.out_dir}; rerun the same command to resume",
        )
        raise typer.Exit(130) from None
    _say(f"[green]done[/] in {time.perf_counter() - start:.0f}s;", f"results in {store.root}")
    try:
        index, _ = _report(store.root)
    except OpdlensError as exc:  # e.g. no valid node: the results are kept, the report has nothing to show
        _say("[bold red]no report:[/]", exc)
        raise typer.Exit(EXIT_NO_REPORT) from None
    except OSError as exc:
        if (full := _disk_full(exc)) is None:
            raise
        _say("[bold red]no report:[/]", full)
        raise typer.Exit(EXIT_NO_REPORT) from None
    _say("report:", index)
    _say("summary:", index.parent / "summary.md")
    return index


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="run directory (rerun to resume)"),
    questions: int = typer.Option(4, min=1, help="number of built-in arithmetic questions"),
    fresh: bool = typer.Option(
        False, "--fresh", help="move an existing run directory aside (<out>.old-<time>) and start afresh"
    ),
) -> None:
    """The main job on the embedded default: SmolLM2-135M, built-in arithmetic, three self-distillation teachers."""
    from opdlens.diagnose.config import demo_config

    try:
        cfg = demo_config(str(out), questions)
        _say(
            "",
            f"diagnosing {cfg.student} on {questions} '{cfg.task}' questions with teachers "
            f"{', '.join(t.name for t in cfg.teachers)} → {out}",
        )
        _run_diagnose(cfg, None, fresh)
    except (OpdlensError, OSError) as exc:
        _fail(exc)


#: Help of the KEY=VALUE arguments of ``diagnose`` and ``train``.
OVERRIDES_HELP = (
    "overrides of the config's keys, KEY=VALUE: a dotted key (a number is a list index) and a YAML value, "
    "e.g. signals.min_visits=10 teachers.0.model=Qwen/Qwen3-1.7B task_args='{path: d.jsonl}'; recorded in the "
    "run's config.yaml"
)


@app.command(name="diagnose")
def diagnose_cmd(
    config: Path = typer.Argument(..., help="YAML run config (see configs/)"),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="KEY=VALUE", help=OVERRIDES_HELP),
    out: Optional[Path] = typer.Option(None, help="override out_dir"),
    ray: Optional[str] = typer.Option(
        None, help="run on Ray: 'local' (start a local cluster), 'auto' (the running cluster) or an address"
    ),
    fresh: bool = typer.Option(
        False,
        "--fresh",
        help="move an existing run directory aside (<out_dir>.old-<time>) and start afresh; "
        "needed when the directory holds results of another configuration",
    ),
) -> None:
    """Phase 1 (rollouts, targeted enrichment) and phase 2 (teacher scoring), then the report."""
    from opdlens.diagnose.config import DiagnoseConfig

    try:
        cfg = DiagnoseConfig.from_yaml(config, overrides or [])
        if out is not None:
            cfg = cfg.model_copy(update={"out_dir": str(out)})
        _run_diagnose(cfg, ray, fresh)
    except (OpdlensError, OSError) as exc:
        _fail(exc)


@app.command()
def rescore(
    run_dir: Path = typer.Argument(..., help="a finished `opdlens diagnose` run"),
    overrides: Optional[list[str]] = typer.Argument(
        None, metavar="KEY=VALUE", help="scoring keys to change (signals.*, tree_accounting, stat_unit)"
    ),
    out: Path = typer.Option(..., help="the new run directory"),
    scoring: Optional[str] = typer.Option(
        None, help="set every scoring key to this protocol's: 'paper' (protocol: paper) or 'opdlens' (our defaults)"
    ),
    fresh: bool = typer.Option(False, "--fresh", help="move an existing --out directory aside first"),
) -> None:
    """Score a finished run's tree again under other scoring choices (same rollouts), then the report."""
    from opdlens.diagnose.rescore import rescore as run_rescore

    try:
        if scoring not in (None, "paper", "opdlens"):
            raise OpdlensError(f"--scoring must be 'paper' or 'opdlens', got {scoring!r}")
        start = time.perf_counter()
        store = run_rescore(run_dir, out, overrides or [], scoring=scoring, fresh=fresh)  # type: ignore[arg-type]
        _say(f"[green]done[/] in {time.perf_counter() - start:.0f}s;", f"results in {store.root}")
        index, _ = _report(store.root)
        _say("report:", index)
    except (OpdlensError, OSError) as exc:
        _fail(exc)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run directory written by diagnose/demo"),
    train_run: list[Path] = typer.Option([], "--train", help="OPD run directory whose curve to include (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", help="report directory (default: RUN_DIR/report)"),
) -> None:
    """(Re)build the report of a run: summary.md, CSVs, figures, index.html (+ OPD training curves).

    On an unfinished run the report shows the questions scored so far, says so, and the exit
    status is 3."""
    try:
        extra = []
        for d in train_run:
            png = d / "rkl_curve.png"
            if not png.is_file():
                raise OpdlensError(
                    f"{d} has no rkl_curve.png: run `opdlens train` (or python -m opdlens.opd.demo) there first"
                )
            extra.append((f"OPD training: {d.name}", png))
        index, partial = _report(run_dir, out, extra)
    except (OpdlensError, OSError) as exc:
        _fail(exc)
    _say("report:", index)
    if partial:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def audit(
    run_dir: Path = typer.Argument(..., help="a finished run directory written by diagnose/demo"),
    losses: list[str] = typer.Option(
        [],
        "--losses",
        help="audited losses by name, shell globs (* and ?) allowed, repeatable, e.g. --losses 'opd[*' "
        "--losses 'full*' (default: every loss; --list shows them)",
    ),
    loss: list[str] = typer.Option(
        [], "--loss", help="your own loss as module:function or file.py:function (repeatable; docs/AUDIT.md)"
    ),
    unit: Optional[str] = typer.Option(None, help="statistical unit of the CIs: path or question (default: the run's)"),
    device: Optional[str] = typer.Option(None, help="device of the models (default: the run's)"),
    list_losses: bool = typer.Option(False, "--list", help="list the audited losses and exit"),
) -> None:
    """Audit losses on a finished run: each loss's per-node gradient (autograd through its own code) against
    the ideal gradient, aggregated like Table 1; writes RUN_DIR/audit/ and adds a line to the run's report."""
    from opdlens.audit.losses import default_losses, select_losses
    from opdlens.audit.run import audit_run

    if list_losses:
        for x in default_losses():
            typer.echo(f"{x.name}\t{x.expectation}\t{x.doc}")
        return
    try:
        if unit is not None and unit not in ("path", "question"):
            raise OpdlensError(f"--unit must be 'path' or 'question', got {unit!r}")
        if device is not None:
            _check_device(device)
        chosen = select_losses(losses, loss)
        _say("", f"auditing {len(chosen)} loss(es) on {run_dir}")
        summary = audit_run(run_dir, chosen, unit=unit, device=device)
        index, _ = _report(run_dir)
    except (OpdlensError, OSError) as exc:
        _fail(exc)
    _say("audit:", summary)
    _say("report:", index)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories written by diagnose/demo (one setting each)"),
    out: Path = typer.Option(Path("runs/compare"), help="folder for the study's CSVs, figures and summary.md"),
    metric: str = typer.Option(
        "align_gkd", help="alignment column: align_gkd, align_single, align_minillm, align_drgrpo"
    ),
    bins: str = typer.Option("0.2,0.5,0.8", help="inner edges of the difficulty bins (student success rate)"),
    incontext: bool = typer.Option(
        False,
        "--incontext",
        help="first sample the student under each self-teacher context of each run "
        "(stored in the run directory, resumable) and add the in-context accuracy table",
    ),
    samples: int = typer.Option(32, "--incontext-samples", min=1, help="completions per question and context"),
    device: Optional[str] = typer.Option(None, help="device of the --incontext sampling (default: each run's)"),
) -> None:
    """The study across runs: Table 1 (teachers x settings, correct/incorrect paths), p-values, difficulty
    bins, best teacher per bin, and with --incontext the student's accuracy under each self-teacher context."""
    from opdlens.report.incontext import run_incontext
    from opdlens.report.study import compare_runs, parse_edges
    from opdlens.report.study_tables import write_study

    try:
        edges = parse_edges(bins)
        study = compare_runs(runs, metric, edges)  # checks the runs before any sampling
        if incontext:
            for run_dir in runs:
                _say("in-context accuracy:", run_dir)
                run_incontext(run_dir, samples, device=device)
            study = compare_runs(runs, metric, edges)
        summary = write_study(study, out)
    except (OpdlensError, OSError) as exc:
        _fail(exc)
    _say("study:", summary)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML training config"),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="KEY=VALUE", help=OVERRIDES_HELP),
    fresh: bool = typer.Option(
        False,
        "--fresh",
        help="move an existing run directory aside (<out_dir>.old-<time>) and start afresh; "
        "needed when the directory holds a run of another configuration",
    ),
) -> None:
    """On-policy distillation training (see opdlens.opd); rerun to resume (same configuration only)."""
    from opdlens.opd.cli import train_cmd

    try:
        train_cmd(config, fresh=fresh, overrides=overrides or [])
    except (OpdlensError, OSError) as exc:
        _fail(exc)


@app.command()
def tasks() -> None:
    """List the registered tasks."""
    from opdlens.tasks import list_tasks

    for name in list_tasks():
        typer.echo(name)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
