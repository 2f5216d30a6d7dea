r"""Recipes for when OPD fails (paper B's recipe), and the config stages that run them.

* :func:`~opdlens.opd.coldstart.cold_start_sft` (in :mod:`opdlens.opd.coldstart`): SFT of the
  student on filtered teacher rollouts before OPD (the paper raises the initial top-k overlap this way).
* :func:`select_template`: score candidate prompt templates by the *initial* top-k overlap
  ratio between student and teacher on a few student rollouts; the best-aligned template is
  the one to train with (``TrainConfig.student_template`` / ``teacher_template``);
* prompt selection (:mod:`opdlens.opd.prompts`): ``select_teacher_prompts`` keeps the training
  prompts found in the teacher's post-training prompts (paper B's teacher-aligned recipe),
  ``drop_duplicate_prompts`` drops those found in a reference set (paper B's control set);
* :func:`run_stages`: the configured stages before OPD (``select_teacher_prompts``,
  ``drop_duplicate_prompts``, ``template_selection``, ``cold_start`` of
  :class:`~opdlens.opd.config.TrainConfig`), recorded
  in ``stages.json`` so that a resumed run (:func:`replay_stages`) trains on the same prompts
  and templates without re-running them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from opdlens.errors import OpdlensError
from opdlens.io import atomic_write
from opdlens.opd.batching import completion_logits
from opdlens.opd.coldstart import cold_start_sft
from opdlens.opd.config import resolve_template
from opdlens.opd.metrics import token_metrics
from opdlens.opd.prompts import match_prompts, read_prompts, teacher_aligned, without_matches
from opdlens.opd.scoring import encode_user, pad_id, step_seed
from opdlens.policy import check_same_tokenizer


# ---------------------------------------------------------------------------- template selection
@dataclass(frozen=True)
class TemplateScore:
    """Initial alignment of one candidate template (means over generated tokens)."""

    name: str
    template: str
    overlap_ratio: float
    rkl: float
    student_shared_mass: float
    n_tokens: int


@torch.no_grad()
def select_template(
    candidates: Mapping[str, str] | Sequence[str],
    student: Any,
    teacher: Any,
    questions: Sequence[Any],
    *,
    apply_to: Literal["both", "teacher"] = "both",
    n_rollouts: int = 2,
    max_new_tokens: int = 64,
    k: int = 16,
    micro_batch: int = 8,
    seed: int = 0,
    student_thinking: bool | None = None,
    teacher_thinking: bool | None = None,
) -> list[TemplateScore]:
    r"""Rank prompt templates by the initial top-k overlap ratio ``|S^p ∩ S^q| / k``.

    For each candidate template (a :data:`~opdlens.opd.config.TEMPLATES` name or a format string
    with ``{prompt}`` and optionally ``{answer}``): ``n_rollouts`` student rollouts per question
    are scored by student and teacher, and the token-mean overlap ratio (plus reverse KL and the
    student mass on the shared set) is computed. ``apply_to="both"``: the template is the prompt
    of both models (student rollouts are re-sampled per template, the usual *teacher-aligned
    prompt* setting); ``"teacher"``: only the teacher's context changes, the student rollouts are
    sampled once from the plain prompt. Returns the scores sorted best first (highest overlap).
    """
    check_same_tokenizer(student, teacher)
    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    else:
        items = [(str(c), str(c)) for c in candidates]
    if not items:
        raise OpdlensError("select_template needs at least one candidate template")
    if not questions:
        raise OpdlensError("select_template needs at least one question")
    kk = min(k, student.vocab_size)
    plain = [encode_user(student, q.prompt, student_thinking) for q in questions]
    shared_rollouts = None
    if apply_to == "teacher":
        shared_rollouts = student.sample(plain, n_rollouts, max_new_tokens, seed=step_seed(seed, 0, salt=4))
    elif apply_to != "both":
        raise OpdlensError(f"apply_to must be 'both' or 'teacher', got {apply_to!r}")
    scores = []
    for name, raw in items:
        tpl = resolve_template(raw)
        t_ctx = [
            encode_user(teacher, tpl.format(prompt=q.prompt, answer=q.answer), teacher_thinking) for q in questions
        ]
        if apply_to == "both":
            s_ctx = [
                encode_user(student, tpl.format(prompt=q.prompt, answer=q.answer), student_thinking) for q in questions
            ]
            outs = student.sample(s_ctx, n_rollouts, max_new_tokens, seed=step_seed(seed, 0, salt=4))
        else:
            s_ctx, outs = plain, shared_rollouts
        rows = [(s, t, list(c.tokens)) for s, t, comps in zip(s_ctx, t_ctx, outs) for c in comps if c.tokens]
        sums = {"overlap_ratio": 0.0, "rkl": 0.0, "student_shared_mass": 0.0}
        n = 0
        for i in range(0, len(rows), micro_batch):
            mb = rows[i : i + micro_batch]
            ys = [r[2] for r in mb]
            s_log, mask = completion_logits(student.model, [r[0] for r in mb], ys, pad_id=pad_id(student))
            t_log, _ = completion_logits(teacher.model, [r[1] for r in mb], ys, pad_id=pad_id(teacher))
            m = token_metrics(s_log, t_log.to(s_log.device), k=kk)
            sel = mask.bool()
            for key in sums:
                sums[key] += float(getattr(m, key)[sel].double().sum())
            n += int(sel.sum())
        if n == 0:
            raise OpdlensError(f"template {name!r}: the student produced no tokens to score")
        scores.append(
            TemplateScore(name, tpl, sums["overlap_ratio"] / n, sums["rkl"] / n, sums["student_shared_mass"] / n, n)
        )
    return sorted(scores, key=lambda s: -s.overlap_ratio)


# ---------------------------------------------------------------------------- config stages
STAGES_FILE = "stages.json"


def run_stages(
    cfg: Any, student: Any, teacher: Any, task: Any, questions: list[Any], out_dir: Path
) -> tuple[Any, list[Any], dict[str, Any]]:
    """Run the configured stages in order: teacher-aligned prompt selection, duplicate-prompt
    removal, template selection, cold start.

    Returns the config with the chosen templates, the kept training questions and a flat dict
    of what each stage did (logged with step 0). Writes ``out_dir/stages.json``.
    """
    record: dict[str, Any] = {}
    log: dict[str, Any] = {}
    for key, select, what in (
        ("select_teacher_prompts", teacher_aligned, "found in the teacher's post-training prompts"),
        ("drop_duplicate_prompts", without_matches, "not found in the reference prompts"),
    ):
        ps = getattr(cfg, key)
        if ps is None:
            continue
        m = match_prompts(
            [q.prompt for q in questions],
            read_prompts(ps.reference, f"{key}.reference"),
            suffixes=ps.suffixes,
            exact=ps.exact,
            near=ps.near,
            threshold=ps.threshold,
            embedding_model=ps.embedding_model,
            num_perm=ps.num_perm,
            shingle=ps.shingle,
        )
        kept = select(m)
        if not kept:
            raise OpdlensError(
                f"{key} kept none of the {len(questions)} training questions (none {what}, {ps.reference}): "
                "check the file, the suffixes or the threshold"
            )
        questions = [questions[i] for i in kept]
        record["kept_question_ids"] = [q.id for q in questions]
        log.update({f"{key}_exact": sum(m.exact), f"{key}_near": sum(m.near), f"{key}_kept": len(kept)})
    if cfg.template_selection is not None:
        ts = cfg.template_selection
        scores = select_template(
            ts.candidates,
            student,
            teacher,
            questions[: ts.questions],
            apply_to=ts.apply_to,
            n_rollouts=ts.n_rollouts,
            max_new_tokens=ts.max_new_tokens,
            k=cfg.metrics_k,
            micro_batch=cfg.micro_batch,
            seed=cfg.seed,
            student_thinking=cfg.student_thinking,
            teacher_thinking=cfg.teacher_thinking,
        )
        best = scores[0]
        update = {"teacher_template": best.template}
        if ts.apply_to == "both":
            update["student_template"] = best.template
        record["templates"] = update
        cfg = cfg.model_copy(update=update)
        log["template_selected"] = best.name
        log.update({f"template_overlap_{s.name}": s.overlap_ratio for s in scores})
    if cfg.cold_start is not None:
        cs = cfg.cold_start
        qs = questions[: cs.questions] if cs.questions else questions
        res_cs = cold_start_sft(
            student,
            teacher,
            qs,
            n_per_question=cs.n_per_question,
            temperature=cs.temperature,
            top_p=cs.top_p,
            max_new_tokens=cs.max_new_tokens or cfg.token_budget(task),
            student_template=cfg.student_template,
            teacher_template=cs.teacher_template or cfg.teacher_template,
            lr=cs.lr,
            epochs=cs.epochs,
            batch_size=cs.batch_size,
            micro_batch=cs.micro_batch,
            lr_schedule=cs.lr_schedule,
            warmup_ratio=cs.warmup_ratio,
            max_seq_tokens=cs.max_seq_tokens,
            filter=cs.filter,
            max_attempts=cs.max_attempts,
            seed=cfg.seed,
            student_thinking=cfg.student_thinking,
            teacher_thinking=cfg.teacher_thinking if cs.teacher_thinking is None else cs.teacher_thinking,
        )
        log.update({f"cold_start_{k}": v for k, v in res_cs.as_dict().items()})
    record["log"] = log
    atomic_write(out_dir / STAGES_FILE, json.dumps(record, indent=1))
    return cfg, questions, log


def replay_stages(cfg: Any, questions: list[Any], out_dir: Path) -> tuple[Any, list[Any]]:
    """A resumed run: the recorded templates and kept questions (the cold-started weights are in
    the checkpoint)."""
    record = json.loads((out_dir / STAGES_FILE).read_text())
    if "templates" in record:
        cfg = cfg.model_copy(update=record["templates"])
    if "kept_question_ids" in record:
        keep = set(record["kept_question_ids"])
        questions = [q for q in questions if q.id in keep]
    return cfg, questions
