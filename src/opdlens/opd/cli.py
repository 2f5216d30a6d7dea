"""``opdlens train CONFIG.yaml`` and the link from ``opdlens diagnose`` to training.

A train config is a :class:`~opdlens.opd.config.TrainConfig` in YAML, e.g. (defaults of the
paper where not set: lr 1e-6, batch 64, top-k 16, no KL regularisation)::

    student: smollm2                  # 'smollm2', a local model directory or a HF id
    teacher: smollm2                  # same tokenizer required (checked)
    teacher_template: answer_hint     # or a format string with {prompt} / {answer}
    task: arith
    loss: opd                         # the authors' top-k OPD (docs/OPD.md lists all losses)
    k: 16                             # 0: sampled-token
    topk_set: student                 # teacher | intersection | union | symmetric_difference
    topk_weight: student              # teacher | uniform
    batch_size: 64
    micro_batch: 8
    max_new_tokens: 256
    steps: 200
    eval_every: 10
    save_every: 50
    out_dir: runs/opd-smollm2
    device: auto                      # cuda when available

It may instead start from
a diagnose run and one of its teacher configurations::

    from_diagnose: runs/diagnose      # a run directory of `opdlens diagnose` (its config.yaml)
    teacher_config: best              # or a teacher name of that run, e.g. Self-1C
    lr: 1.0e-6                        # any TrainConfig key overrides
    out_dir: runs/opd-self1c

``best`` picks the teacher with the highest mean per-path alignment (``align_gkd``, see
:func:`opdlens.report.aggregate.per_teacher`) in that run. Student, task, task arguments, generation
budget and the teacher (model and context) are taken from the diagnose config, so diagnostics
and training use the same models, tasks, contexts and per-token signals.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opdlens.config import apply_overrides, read_yaml, set_overrides, validate_config
from opdlens.diagnose.teachers import get_context, trainable_contexts
from opdlens.errors import OpdlensError
from opdlens.opd.config import TrainConfig
from opdlens.opd.run import TrainResult, train


def best_teacher(run_dir: str | Path, metric: str = "align_gkd") -> str:
    """Name of the teacher configuration with the highest mean path alignment in a diagnose run."""
    from opdlens.diagnose.store import RunStore
    from opdlens.report.aggregate import per_teacher
    from opdlens.report.run import load_results

    nodes, _, _ = load_results(RunStore(run_dir))
    table = per_teacher(nodes, metric).table.sort_values("mean", ascending=False)
    if table.empty:
        raise OpdlensError(f"no teacher has valid nodes in {run_dir}; cannot pick the best-aligned one")
    return str(table["teacher"].iloc[0])


def train_config_from_diagnose(diagnose: Any, teacher: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` for one teacher configuration of a :class:`~opdlens.diagnose.config.DiagnoseConfig`.

    The teacher's model (or the student itself for self-distillation) and its context
    (any registered context that needs no summary) carry over; summary contexts (``sum-*``) need a
    summariser model during training and are refused with a clear message.
    """
    specs = {t.name: t for t in diagnose.teachers}
    if teacher not in specs:
        raise OpdlensError(f"teacher {teacher!r} is not in the diagnose config; known: {', '.join(specs)}")
    spec = specs[teacher]
    if not get_context(spec.context).trainable:
        raise OpdlensError(
            f"teacher {teacher!r} uses context {spec.context!r}; training supports {', '.join(trainable_contexts())} "
            "(summaries need a summariser model in the loop): pick another teacher configuration"
        )
    base: dict[str, Any] = dict(
        student=diagnose.student,
        teacher=spec.model or diagnose.student,
        task=diagnose.task,
        task_args=dict(diagnose.task_args),
        max_new_tokens=diagnose.max_new_tokens,
        seed=diagnose.seed,
        teacher_context=spec.context,
        device=diagnose.device,
    )
    base.update(overrides)
    return validate_config(TrainConfig, base, f"from diagnose teacher {teacher!r}")


#: Keys of a train YAML that start from a diagnose run (not :class:`TrainConfig` keys).
FROM_DIAGNOSE_KEYS = ("from_diagnose", "teacher_config")


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a train YAML: a plain :class:`TrainConfig`, or ``from_diagnose`` + ``teacher_config``;
    ``overrides`` (``KEY=VALUE``, :func:`opdlens.config.apply_overrides`) change its keys first."""
    p = Path(path)
    data = read_yaml(p)
    if "from_diagnose" not in data:
        return TrainConfig.from_yaml(p, overrides)
    from opdlens.diagnose.config import DiagnoseConfig

    own = [o for o in overrides if o.partition("=")[0].strip() in FROM_DIAGNOSE_KEYS]
    data = apply_overrides(data, own)
    data = apply_overrides(data, [o for o in overrides if o not in own], TrainConfig)

    run_dir = Path(data.pop("from_diagnose"))
    if not run_dir.is_absolute():
        run_dir = (p.parent / run_dir) if (p.parent / run_dir).exists() else run_dir
    choice = str(data.pop("teacher_config", "best"))
    cfg_file = run_dir / "config.yaml" if run_dir.is_dir() else run_dir
    diag = DiagnoseConfig.from_yaml(cfg_file)
    teacher = best_teacher(run_dir) if choice == "best" else choice
    return set_overrides(train_config_from_diagnose(diag, teacher, **data), overrides)


def train_cmd(config: Path, fresh: bool = False, overrides: Sequence[str] = ()) -> TrainResult:
    """``opdlens train CONFIG.yaml [KEY=VALUE ...] [--fresh]``: run or resume OPD training; prints a
    short summary. ``overrides`` change the config's keys (:func:`load_train_config`).

    A rerun resumes only a run of the same configuration and inputs (``out_dir/fingerprint.json``,
    see :func:`opdlens.opd.run.train`); ``fresh`` first moves an existing run directory aside.
    Typer-compatible. Errors are :class:`OpdlensError` with a message.
    """
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)  # as opdlens.cli: printed paths stay whole
    cfg = load_train_config(config, overrides)
    console.print(
        f"[bold]opdlens train[/]: student={cfg.student} teacher={cfg.teacher} "
        f"context={cfg.teacher_context or cfg.teacher_template} loss={cfg.loss} k={cfg.k} "
        f"lr={cfg.lr:g} batch={cfg.batch_size} steps={cfg.steps} -> {cfg.out_dir}"
    )
    res = train(cfg, fresh=fresh)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: the main process reports
        return res
    from opdlens.opd.runlog import read_metrics
    from opdlens.report.figures import plot_training_curve

    curve = plot_training_curve(
        read_metrics(res.out_dir), res.out_dir / "rkl_curve.png", f"OPD: {cfg.student} ← {cfg.teacher}, loss={cfg.loss}"
    )
    if res.resumed_from is not None:
        console.print(f"resumed from step {res.resumed_from}")
    par = res.parallel
    if par.get("processes", 1) > 1:
        console.print(
            f"{par['strategy']}: {par['processes']} processes; the main one holds {par['params_here']:,} of the "
            f"student's {par['params']:,} parameters"
        )
    rows = [r for r in res.history if r.get("eval_rkl") is not None]
    if len(rows) >= 2:
        console.print(
            f"held-out reverse KL: {rows[0]['eval_rkl']:.4f} (step {rows[0]['step']}) -> "
            f"{rows[-1]['eval_rkl']:.4f} (step {rows[-1]['step']}); "
            f"reward {rows[0].get('eval_reward')} -> {rows[-1].get('eval_reward')}"
        )
    console.print(
        f"logs: {res.out_dir / 'metrics.jsonl'}, TensorBoard: {res.out_dir / 'tb'}; "
        f"last checkpoint: {res.last_checkpoint}; curve: {curve}"
    )
    return res
