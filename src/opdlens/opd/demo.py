r"""A short OPD run on the embedded SmolLM2-135M-Instruct (CPU) that lowers reverse KL to a teacher.

``python -m opdlens.opd.demo [--steps 12] [--out-dir runs/opd-demo] [--model smollm2]``

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

import argparse
import json
import math
from pathlib import Path
from typing import Any

from opdlens.opd.losses import LOSSES
from opdlens.opd.trainer import TrainConfig, read_metrics, train
from opdlens.report.figures import plot_training_curve


#: A teacher prompt whose style differs from the student's (same information, another register).
MISALIGNED = ("Réponds uniquement en français, en vers, avec beaucoup de détails inutiles.\n\n{prompt}\n\n"
              "(Indice : la bonne réponse finale est {answer}.)")


def compare_templates(a: argparse.Namespace) -> dict[str, Any]:
    """Aligned vs misaligned teacher template: initial overlap and held-out reverse-KL gain."""
    out: dict[str, Any] = {}
    for name, tpl in (("aligned", "answer_hint"), ("misaligned", MISALIGNED)):
        cfg = _config(a, tpl, a.out_dir / name)
        train(cfg, resume=not a.fresh)
        ev = [r for r in read_metrics(cfg.out_dir) if r.get("eval_rkl") is not None]
        start, end = ev[0]["eval_rkl"], ev[-1]["eval_rkl"]
        out[name] = {"initial_overlap_ratio": ev[0]["eval_overlap_ratio"], "eval_rkl_start": start, "eval_rkl_end": end,
                     "eval_rkl_gain": start - end, "eval_rkl_change_pct": 100.0 * (end - start) / start,
                     "final_overlap_ratio": ev[-1]["eval_overlap_ratio"]}
        print(f"{name:>10}: initial overlap {out[name]['initial_overlap_ratio']:.3f}, held-out reverse KL "
              f"{start:.4f} -> {end:.4f} ({out[name]['eval_rkl_change_pct']:+.1f}%)")
    print(json.dumps(out, indent=1))
    (a.out_dir / "compare_templates.json").write_text(json.dumps(out, indent=1))
    return out


def _config(a: argparse.Namespace, teacher_template: str, out_dir: Path) -> TrainConfig:
    return TrainConfig(
        student=a.model, teacher=a.model, task="arith", train_questions=64, eval_questions=a.eval_questions,
        teacher_template=teacher_template, teacher_temperature=a.teacher_temperature, loss=a.loss,
        lr=a.lr, batch_size=a.batch_size, micro_batch=a.batch_size, max_new_tokens=a.max_new_tokens,
        steps=a.steps, seed=a.seed, eval_every=a.eval_every, save_every=0, out_dir=out_dir, device=a.device,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/opd-demo"))
    ap.add_argument("--model", default="smollm2", help="student and (frozen) teacher: a model id or directory")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--loss", default="opd", choices=sorted(LOSSES))
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--eval-questions", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--teacher-template", default="answer_hint")
    ap.add_argument("--teacher-temperature", type=float, default=1.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for a 135M model on a small or busy machine)")
    ap.add_argument("--fresh", action="store_true", help="ignore checkpoints in --out-dir (start over)")
    ap.add_argument("--compare-templates", action="store_true", help="aligned vs misaligned teacher template")
    a = ap.parse_args(argv)
    if a.threads > 0:
        import torch

        torch.set_num_threads(a.threads)
    if a.compare_templates:
        return compare_templates(a)
    cfg = _config(a, a.teacher_template, a.out_dir)
    res = train(cfg, resume=not a.fresh)
    rows = read_metrics(a.out_dir)
    png = plot_training_curve(rows, a.out_dir / "rkl_curve.png",
                     f"OPD on {'SmolLM2-135M' if a.model == 'smollm2' else a.model}: loss={a.loss}, teacher={a.teacher_template}, lr={a.lr:g}")
    ev = [r for r in rows if r.get("eval_rkl") is not None]
    start, end = ev[0]["eval_rkl"], ev[-1]["eval_rkl"]
    tr = [r["rkl"] for r in rows if r.get("rkl") is not None]
    summary = {
        "eval_rkl_start": start, "eval_rkl_end": end,
        "eval_rkl_change_pct": 100.0 * (end - start) / start if start else math.nan,
        "train_rkl_first": tr[0] if tr else None, "train_rkl_last": tr[-1] if tr else None,
        "eval_reward_start": ev[0].get("eval_reward"), "eval_reward_end": ev[-1].get("eval_reward"),
        "steps": res.last_step, "curve": str(png), "metrics": str(a.out_dir / "metrics.jsonl"),
    }
    print(f"held-out reverse KL to the teacher: start {start:.4f} -> end {end:.4f} nats/token "
          f"({summary['eval_rkl_change_pct']:+.1f}%) after {res.last_step} steps")
    print(json.dumps(summary, indent=1))
    (a.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
