r"""Recipes for when OPD fails (paper B's recipe), and the config stages that run them.

* :func:`cold_start_sft`: the teacher answers the training prompts at temperature 0.7; rollouts
  that are *incomplete* (no EOS within the budget) or *degenerate* (repetition, see
  :func:`is_degenerate`) are dropped and counted; the student is fine-tuned with cross-entropy
  on the rest (teacher tokens, conditioned on the *student's* prompt), which closes the
  thinking-pattern gap before OPD (the paper raises the initial top-k overlap this way).
* :func:`select_template`: score candidate prompt templates by the *initial* top-k overlap
  ratio between student and teacher on a few student rollouts; the best-aligned template is
  the one to train with (``TrainConfig.student_template`` / ``teacher_template``);
* :func:`dedup_prompts`: teacher-aligned prompt selection: drop training prompts that duplicate
  a reference set, by exact match (after normalisation), then near-duplicates (MinHash Jaccard
  with LSH, the ``datasketch`` package; or cosine of mean-pooled embeddings of a given model);
* :func:`run_stages`: the configured stages before OPD (``prompt_selection``,
  ``template_selection``, ``cold_start`` of :class:`~opdlens.opd.config.TrainConfig`), recorded
  in ``stages.json`` so that a resumed run (:func:`replay_stages`) trains on the same prompts
  and templates without re-running them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from opdlens.errors import OpdlensError
from opdlens.io import atomic_write
from opdlens.opd.batching import completion_logits, pad_tokens
from opdlens.opd.config import resolve_template
from opdlens.opd.metrics import token_metrics
from opdlens.opd.scoring import encode_user, pad_id, step_seed
from opdlens.policy import check_same_tokenizer


# ---------------------------------------------------------------------------- filtering
def is_degenerate(tokens: Sequence[int], *, ngram: int = 4, max_repeat_frac: float = 0.5, max_run: int = 12) -> bool:
    """Whether a completion is degenerate (looping or stuck).

    Two tests on the token ids: the longest run of one repeated token is ``>= max_run``, or the
    fraction of repeated ``ngram``-grams, ``1 − #distinct / #total``, exceeds ``max_repeat_frac``
    (needs at least ``2 · ngram`` tokens). A sentence repeated four times has a repeated-4-gram
    fraction near 3/4; ordinary text is far below 1/2.
    """
    toks = list(tokens)
    if not toks:
        return True
    run = best = 1
    for a, b in zip(toks, toks[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    if best >= max_run:
        return True
    if len(toks) >= 2 * ngram:
        grams = [tuple(toks[i : i + ngram]) for i in range(len(toks) - ngram + 1)]
        if 1.0 - len(set(grams)) / len(grams) > max_repeat_frac:
            return True
    return False


@dataclass
class ColdStartResult:
    """Counts of the rollout filter and the SFT loss per optimizer step."""

    n_rollouts: int
    n_incomplete: int
    n_degenerate: int
    n_kept: int
    losses: list[float] = field(default_factory=list)
    kept: list[tuple[str, list[int]]] = field(default_factory=list)  # (question id, teacher tokens)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n_rollouts": self.n_rollouts,
            "n_incomplete": self.n_incomplete,
            "n_degenerate": self.n_degenerate,
            "n_kept": self.n_kept,
            "sft_loss_first": self.losses[0] if self.losses else None,
            "sft_loss_last": self.losses[-1] if self.losses else None,
        }


def cold_start_sft(
    student: Any,
    teacher: Any,
    questions: Sequence[Any],
    *,
    n_per_question: int = 1,
    temperature: float = 0.7,
    max_new_tokens: int = 256,
    student_template: str = "same",
    teacher_template: str = "same",
    lr: float = 1e-5,
    epochs: int = 1,
    batch_size: int = 8,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    degenerate: Mapping[str, Any] | None = None,
    student_thinking: bool | None = None,
    teacher_thinking: bool | None = None,
) -> ColdStartResult:
    r"""Off-policy cold start: SFT of the student on filtered teacher rollouts (in place).

    1. the teacher samples ``n_per_question`` completions per question at ``temperature``
       (paper: 0.7) from its context (``teacher_template``);
    2. drop *incomplete* rollouts (no EOS within ``max_new_tokens``) and *degenerate* ones
       (:func:`is_degenerate`, options in ``degenerate``); both counts are returned;
    3. ``epochs`` passes of AdamW over the kept rollouts in shuffled batches of ``batch_size``,
       minimising the token-mean cross-entropy ``−(1/N) Σ_t log p(y_t | student prompt, y_<t)``
       of the teacher tokens ``y`` (EOS included) given the *student's* prompt.

    Raises :class:`OpdlensError` when every rollout is filtered out.
    """
    check_same_tokenizer(student, teacher)
    if not questions:
        raise OpdlensError("cold_start_sft needs at least one question")
    s_tpl, t_tpl = resolve_template(student_template), resolve_template(teacher_template)
    t_ctx = [encode_user(teacher, t_tpl.format(prompt=q.prompt, answer=q.answer), teacher_thinking) for q in questions]
    with torch.no_grad():
        outs = teacher.sample(
            t_ctx, n_per_question, max_new_tokens, seed=step_seed(seed, 0, salt=3), temperature=temperature
        )
    n_inc = n_deg = 0
    kept: list[tuple[Any, list[int]]] = []
    opts = dict(degenerate or {})
    for q, comps in zip(questions, outs):
        for c in comps:
            if not c.finished:
                n_inc += 1
            elif is_degenerate([t for t in c.tokens if t not in teacher.eos_token_ids], **opts):
                n_deg += 1
            else:
                kept.append((q, list(c.tokens)))
    n_total = sum(len(c) for c in outs)
    result = ColdStartResult(n_total, n_inc, n_deg, len(kept), kept=[(q.id, y) for q, y in kept])
    if not kept:
        raise OpdlensError(
            f"cold start: all {n_total} teacher rollouts were filtered out ({n_inc} incomplete, {n_deg} degenerate); "
            "raise max_new_tokens, lower the temperature or relax the degeneracy thresholds"
        )
    model = student.model
    model.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    pad = pad_id(student)
    for _ in range(epochs):
        order = rng.permutation(len(kept))
        for i in range(0, len(order), batch_size):
            batch = [kept[j] for j in order[i : i + batch_size]]
            ctx = [
                encode_user(student, s_tpl.format(prompt=q.prompt, answer=q.answer), student_thinking) for q, _ in batch
            ]
            ys = [y for _, y in batch]
            logits, mask = completion_logits(model, ctx, ys, pad_id=pad)
            tok = pad_tokens(ys, logits.device)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            loss = -(logp * mask).sum() / mask.sum().clamp_min(1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            result.losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    return result


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

    For each candidate template (a :data:`~opdlens.opd.trainer.TEMPLATES` name or a format string
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


# ---------------------------------------------------------------------------- prompt selection
def normalise_prompt(text: str) -> str:
    """Lower case, words only, single spaces: the key of exact-duplicate matching."""
    return " ".join(re.findall(r"\w+", text.lower()))


@dataclass
class DedupResult:
    """Indices of the kept prompts and how many were dropped as exact / near duplicates."""

    kept: list[int]
    exact: int
    near: int


def _shingles(text: str, n: int) -> set[bytes]:
    words = normalise_prompt(text).split()
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


def _embed(texts: Sequence[str], model_name: str, batch: int = 32) -> torch.Tensor:
    """Unit-norm mean-pooled last hidden states of a Hugging Face encoder (or decoder)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(model_name).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(list(texts[i : i + batch]), padding=True, truncation=True, max_length=512, return_tensors="pt")
            h = model(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1))
    return torch.cat(out)


def dedup_prompts(
    prompts: Sequence[str],
    against: Sequence[str],
    *,
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: int = 3,
    embedding_model: str | None = None,
) -> DedupResult:
    """Drop ``prompts`` that duplicate one of ``against`` (exact after :func:`normalise_prompt`,
    then near: MinHash Jaccard of word ``shingle``-grams >= ``threshold`` via LSH, or embedding
    cosine >= ``threshold`` when ``embedding_model`` is given)."""
    ref = {normalise_prompt(a) for a in against}
    rest = [i for i, p in enumerate(prompts) if normalise_prompt(p) not in ref]
    exact = len(prompts) - len(rest)
    if not against or not rest:
        return DedupResult(rest, exact, 0)
    if embedding_model is not None:
        e_ref = _embed(list(against), embedding_model)
        e_new = _embed([prompts[i] for i in rest], embedding_model)
        near_mask = (e_new @ e_ref.T).max(dim=1).values >= threshold
        kept = [i for i, near in zip(rest, near_mask.tolist()) if not near]
        return DedupResult(kept, exact, len(rest) - len(kept))
    from datasketch import MinHash, MinHashLSH

    def sig(text: str) -> MinHash:
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(list(_shingles(text, shingle)))
        return m

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    ref_sigs = []
    for j, a in enumerate(against):
        ref_sigs.append(sig(a))
        lsh.insert(str(j), ref_sigs[-1])
    kept = []
    for i in rest:
        m = sig(prompts[i])
        # LSH proposes candidates; keep the estimated Jaccard as the decision
        if not any(m.jaccard(ref_sigs[int(c)]) >= threshold for c in lsh.query(m)):
            kept.append(i)
    return DedupResult(kept, exact, len(rest) - len(kept))


def read_prompts(path: str | Path) -> list[str]:
    """Reference prompts: JSONL rows with a ``prompt`` (or ``question``) field, or one per line."""
    p = Path(path)
    if not p.is_file():
        raise OpdlensError(f"prompt_selection.against: {p} does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
                out.append(str(row.get("prompt", row.get("question"))) if isinstance(row, dict) else str(row))
            except json.JSONDecodeError as e:
                raise OpdlensError(f"{p}:{n}: not JSON ({e.msg})") from e
        else:
            out.append(line)
    return out


# ---------------------------------------------------------------------------- config stages
STAGES_FILE = "stages.json"


def run_stages(
    cfg: Any, student: Any, teacher: Any, task: Any, questions: list[Any], out_dir: Path
) -> tuple[Any, list[Any], dict[str, Any]]:
    """Run the configured stages in order: prompt selection, template selection, cold start.

    Returns the config with the chosen templates, the kept training questions and a flat dict
    of what each stage did (logged with step 0). Writes ``out_dir/stages.json``.
    """
    record: dict[str, Any] = {}
    log: dict[str, Any] = {}
    if cfg.prompt_selection is not None:
        ps = cfg.prompt_selection
        res = dedup_prompts(
            [q.prompt for q in questions],
            read_prompts(ps.against),
            threshold=ps.threshold,
            num_perm=ps.num_perm,
            shingle=ps.shingle,
            embedding_model=ps.embedding_model,
        )
        if not res.kept:
            raise OpdlensError(
                f"prompt_selection removed all {len(questions)} training questions as duplicates of "
                f"{ps.against}: raise the threshold or check the file"
            )
        questions = [questions[i] for i in res.kept]
        record["kept_question_ids"] = [q.id for q in questions]
        log.update(prompt_exact_duplicates=res.exact, prompt_near_duplicates=res.near, prompts_kept=len(res.kept))
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
            max_new_tokens=cs.max_new_tokens or cfg.token_budget(task),
            student_template=cfg.student_template,
            teacher_template=cs.teacher_template or cfg.teacher_template,
            lr=cs.lr,
            epochs=cs.epochs,
            batch_size=cs.batch_size,
            seed=cfg.seed,
            student_thinking=cfg.student_thinking,
            teacher_thinking=cfg.teacher_thinking,
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
