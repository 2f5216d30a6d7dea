r"""A short OPD run on the embedded SmolLM2-135M-Instruct (CPU) that lowers reverse KL to a teacher.

``python -m opdlens.opd.demo [--steps 12] [--out-dir runs/opd-demo] [--model smollm2]`` (``--help``: all options)

``python -m opdlens.opd.demo --compare-templates`` runs the same short OPD twice, with the
teacher's prompt aligned with the student's (``answer_hint``: the question, then the answer)
and misaligned (:data:`MISALIGNED`: the same hint behind an instruction to answer in another
style), and prints the initial top-k overlap and the held-out reverse-KL gain of each.

Teacher (documented choice): the *same* SmolLM2 weights, frozen, given a solution-bearing
context: the arithmetic question followed by the reference answer (template ``answer_hint``),
i.e. a self-distillation teacher in the spirit of the Self-1C configurations of the
diagnostics. The student sees the plain question. Both share the tokenizer, and at step 0 the
student's per-token reverse KL to this teacher is clearly positive, so OPD has something to
close. (``--teacher-temperature 0.5 --teacher-template same`` gives the other simple choice:
the same model at a lower temperature.)

Writes ``metrics.jsonl`` (+ TensorBoard events) and ``rkl_curve.png`` in the output directory
and prints the held-out reverse KL at the start and at the end. The learning rate is higher
than the paper's 1e-6 so that a dozen steps on a tiny batch move the model visibly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from opdlens.entry import choice, run_app
from opdlens.io import atomic_write
from opdlens.opd.config import TrainConfig
from opdlens.opd.registry import LOSSES
from opdlens.opd.run import train
from opdlens.opd.runlog import read_metrics
from opdlens.report.figures import plot_training_curve

#: A teacher prompt whose style differs from the student's (same information, another register).
MISALIGNED = (
    "Réponds uniquement en français, en vers, avec beaucoup de détails inutiles.\n\n{prompt}\n\n"
    "(Indice : la bonne réponse finale est {answer}.)"
)


def compare_templates(base: TrainConfig, fresh: bool) -> dict[str, Any]:
    """Aligned vs misaligned teacher template: initial overlap and held-out reverse-KL gain.

    ``base`` is the plain demo's config; each template trains in its own folder under its
    ``out_dir`` (validated again, so a template that is not a valid format string is refused)."""
    out: dict[str, Any] = {}
    for name, tpl in (("aligned", "answer_hint"), ("misaligned", MISALIGNED)):
        cfg = TrainConfig.model_validate({**base.model_dump(), "teacher_template": tpl, "out_dir": base.out_dir / name})
        train(cfg, resume=not fresh)
        ev = [r for r in read_metrics(cfg.out_dir) if r.get("eval_rkl") is not None]
        start, end = ev[0]["eval_rkl"], ev[-1]["eval_rkl"]
        out[name] = {
            "initial_overlap_ratio": ev[0]["eval_overlap_ratio"],
            "eval_rkl_start": start,
            "eval_rkl_end": end,
            "eval_rkl_gain": start - end,
            "eval_rkl_change_pct": 100.0 * (end - start) / start,
            "final_overlap_ratio": ev[-1]["eval_overlap_ratio"],
        }
        print(
            f"{name:>10}: initial overlap {out[name]['initial_overlap_ratio']:.3f}, held-out reverse KL "
            f"{start:.4f} -> {end:.4f} ({out[name]['eval_rkl_change_pct']:+.1f}%)"
        )
    print(json.dumps(out, indent=1))
    atomic_write(base.out_dir / "compare_templates.json", json.dumps(out, indent=1))
    return out


app = typer.Typer(add_completion=False)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("runs/opd-demo"), help="run directory (rerun to resume)"),
    model: str = typer.Option("smollm2", help="student and (frozen) teacher: a model id or directory"),
    steps: int = typer.Option(12, help="optimizer steps"),
    batch_size: int = typer.Option(4, help="rollouts per step (one micro-batch)"),
    lr: float = typer.Option(2e-5, help="learning rate (higher than the paper's 1e-6: few steps, tiny batch)"),
    loss: str = typer.Option("opd", callback=choice(*sorted(LOSSES)), help=f"one of {', '.join(sorted(LOSSES))}"),
    max_new_tokens: int = typer.Option(40, help="new tokens per rollout"),
    eval_questions: int = typer.Option(6, help="held-out questions"),
    eval_every: int = typer.Option(3, help="steps between held-out evaluations"),
    teacher_template: str = typer.Option("answer_hint", help="teacher prompt: a template name or a format string"),
    teacher_temperature: float = typer.Option(1.0, help="teacher logits are divided by it"),
    device: str = typer.Option("auto", help="'auto' (CUDA when available), 'cpu', 'cuda'"),
    seed: int = typer.Option(0, help="seed of the questions and of the sampling"),
    threads: int = typer.Option(1, help="torch CPU threads (1 is fastest for a 135M model on a small or busy machine)"),
    fresh: bool = typer.Option(False, "--fresh", help="ignore checkpoints in --out-dir (start over)"),
    compare: bool = typer.Option(False, "--compare-templates", help="aligned vs misaligned teacher template"),
) -> dict[str, Any]:
    """A short OPD run on the embedded SmolLM2-135M-Instruct (CPU) that lowers reverse KL to a teacher."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    cfg = TrainConfig(
        student=model,
        teacher=model,
        task="arith",
        train_questions=64,
        eval_questions=eval_questions,
        teacher_template=teacher_template,
        teacher_temperature=teacher_temperature,
        loss=loss,
        lr=lr,
        batch_size=batch_size,
        micro_batch=batch_size,
        max_new_tokens=max_new_tokens,
        steps=steps,
        seed=seed,
        eval_every=eval_every,
        save_every=0,
        out_dir=out_dir,
        device=device,
    )
    if compare:
        return compare_templates(cfg, fresh)
    res = train(cfg, resume=not fresh)
    rows = read_metrics(out_dir)
    name = "SmolLM2-135M" if model == "smollm2" else model
    png = plot_training_curve(
        rows, out_dir / "rkl_curve.png", f"OPD on {name}: loss={loss}, teacher={teacher_template}, lr={lr:g}"
    )
    ev = [r for r in rows if r.get("eval_rkl") is not None]
    start, end = ev[0]["eval_rkl"], ev[-1]["eval_rkl"]
    tr = [r["rkl"] for r in rows if r.get("rkl") is not None]
    summary = {
        "eval_rkl_start": start,
        "eval_rkl_end": end,
        "eval_rkl_change_pct": 100.0 * (end - start) / start if start else math.nan,
        "train_rkl_first": tr[0] if tr else None,
        "train_rkl_last": tr[-1] if tr else None,
        "eval_reward_start": ev[0].get("eval_reward"),
        "eval_reward_end": ev[-1].get("eval_reward"),
        "steps": res.last_step,
        "curve": str(png),
        "metrics": str(out_dir / "metrics.jsonl"),
    }
    print(
        f"held-out reverse KL to the teacher: start {start:.4f} -> end {end:.4f} nats/token "
        f"({summary['eval_rkl_change_pct']:+.1f}%) after {res.last_step} steps"
    )
    print(json.dumps(summary, indent=1))
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the summary (or, with ``--compare-templates``, the comparison)."""
    result: dict[str, Any] = run_app(app, argv, "python -m opdlens.opd.demo")
    return result


if __name__ == "__main__":
    main()
