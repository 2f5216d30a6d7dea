r"""Prompt selection against another prompt set: paper B's teacher-aligned prompts and its control set.

Paper B's recipe (teacher-aligned prompt selection) trains on prompts *from the teacher's
post-training distribution*: their weak-to-strong teacher (JustRL-DeepSeek-1.5B) was RL-trained
on DAPO-Math-17K, and the aligned run trains on DAPO-Math-17K. Their *control* run trains on
DeepMath-103K minus every prompt that matches a DAPO prompt (``scripts/infer/dedup_deepmath.py``
of github thunlp/OPD, read, not copied; §5.2 of the paper):

1. each DAPO prompt loses the instruction suffix :data:`AUTHORS_SUFFIX` (when it ends with it) and
   surrounding white space; a DeepMath question is its raw ``extra_info.question``, stripped;
2. exact match: the same string;
3. near match: cosine ≥ 0.6 between ``all-mpnet-base-v2`` sentence embeddings (mean pooling,
   L2-normalised; nearest DAPO prompt by inner product);
4. the control set is DeepMath without the exact or near matches.

Here both sets come from one matching (:func:`match_prompts`) of the run's training prompts
against a reference file: :func:`teacher_aligned` keeps the matches (the stage
``select_teacher_prompts``), :func:`without_matches` keeps the rest (the stage
``drop_duplicate_prompts``: the authors' control set, or de-contamination against an evaluation
set). On one pool the two are complements. Matching options: ``exact: stripped`` (the authors':
equal strings after the suffix strip) or ``normalised`` (ours: lower case, words only);
``near: embedding`` (the authors', any Hugging Face encoder loaded the sentence-transformers way,
or an injected ``embed`` function), ``minhash`` (ours: Jaccard of word shingles, ``datasketch``)
or ``none``. Suffixes are stripped from both sides (the authors' DeepMath fallback, for rows
without ``extra_info.question``, spells the suffix with doubled braces and so strips nothing).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from opdlens.errors import OpdlensError

#: The instruction suffix of the authors' DAPO-Math prompts (``extract_dapo_question``).
AUTHORS_SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."
#: The authors' sentence encoder (``model/all-mpnet-base-v2``, a local copy of this hub model).
AUTHORS_ENCODER = "sentence-transformers/all-mpnet-base-v2"

Embed = Callable[[Sequence[str]], torch.Tensor]


def strip_suffix(text: str, suffixes: Sequence[str] = ()) -> str:
    """``text`` without the first of ``suffixes`` it ends with, then without surrounding white space."""
    for s in suffixes:
        if s and text.endswith(s):
            text = text[: -len(s)]
            break
    return text.strip()


def normalise_prompt(text: str) -> str:
    """Lower case, words only, single spaces: ours, a looser exact match."""
    return " ".join(re.findall(r"\w+", text.lower()))


@dataclass
class PromptMatch:
    """Per training prompt: exact match, near match (among the non-exact), best similarity
    (NaN where not computed)."""

    exact: list[bool]
    near: list[bool]
    similarity: list[float]

    @property
    def matched(self) -> list[bool]:
        return [e or n for e, n in zip(self.exact, self.near)]


def teacher_aligned(m: PromptMatch) -> list[int]:
    """Indices of the prompts found in the reference (the teacher's post-training prompts)."""
    return [i for i, hit in enumerate(m.matched) if hit]


def without_matches(m: PromptMatch) -> list[int]:
    """Indices of the prompts not found in the reference (the authors' control set)."""
    return [i for i, hit in enumerate(m.matched) if not hit]


# ---------------------------------------------------------------------------- embeddings
def _sentence_config(model_name: str) -> dict[str, Any]:
    """``sentence_bert_config.json`` of a local directory or hub model (empty when absent)."""
    local = Path(model_name) / "sentence_bert_config.json"
    path: Path | None = local if local.is_file() else None
    if path is None and not Path(model_name).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model_name, "sentence_bert_config.json"))
        except Exception:  # noqa: BLE001 - a plain encoder without the file
            path = None
    return json.loads(path.read_text()) if path is not None else {}


def load_embedder(model_name: str, *, batch: int = 64, device: str | None = None) -> Embed:
    """Unit-norm sentence embeddings, the sentence-transformers pipeline of ``all-mpnet-base-v2``
    through transformers: the encoder's last hidden states, mean-pooled over the attention mask,
    L2-normalised; inputs truncated at the model's ``max_seq_length`` (``sentence_bert_config.json``:
    384 for all-mpnet-base-v2; 512 without it)."""
    from transformers import AutoModel, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = AutoTokenizer.from_pretrained(model_name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(model_name).to(dev).eval()
    max_len = int(_sentence_config(model_name).get("max_seq_length", 512))

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch):
            enc = tok(
                list(texts[i : i + batch]), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            ).to(dev)
            h = model(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    return embed


def _max_cosine(a: torch.Tensor, b: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Per row of ``a``, the largest inner product with a row of ``b`` (rows unit-norm), in blocks."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return torch.cat([(a[i : i + block] @ b.T).max(dim=1).values for i in range(0, len(a), block)])


def _shingles(text: str, n: int) -> set[bytes]:
    words = normalise_prompt(text).split()
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


def _minhash_similarity(new: Sequence[str], ref: Sequence[str], threshold: float, num_perm: int, n: int) -> list[float]:
    """Estimated best Jaccard of word ``n``-gram shingles among the LSH candidates (0 when none)."""
    from datasketch import MinHash, MinHashLSH

    def sig(text: str) -> MinHash:
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(list(_shingles(text, n)))
        return m

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    ref_sigs = []
    for j, r in enumerate(ref):
        ref_sigs.append(sig(r))
        lsh.insert(str(j), ref_sigs[-1])
    out = []
    for text in new:
        m = sig(text)
        out.append(max((m.jaccard(ref_sigs[int(c)]) for c in lsh.query(m)), default=0.0))
    return out


# ---------------------------------------------------------------------------- matching
def match_prompts(
    prompts: Sequence[str],
    reference: Sequence[str],
    *,
    suffixes: Sequence[str] = (),
    exact: Literal["stripped", "normalised"] = "stripped",
    near: Literal["embedding", "minhash", "none"] = "embedding",
    threshold: float = 0.6,
    embedding_model: str = AUTHORS_ENCODER,
    embed: Embed | None = None,
    num_perm: int = 128,
    shingle: int = 3,
) -> PromptMatch:
    """Which ``prompts`` are in ``reference``: exact (after the suffix strip, and with ``exact:
    normalised`` :func:`normalise_prompt`), else near (similarity ≥ ``threshold``: embedding cosine
    to the nearest reference prompt, ``embed`` or :func:`load_embedder` of ``embedding_model``; or
    the MinHash Jaccard estimate)."""
    key = (lambda t: normalise_prompt(strip_suffix(t, suffixes))) if exact == "normalised" else None
    p_txt = [strip_suffix(p, suffixes) for p in prompts]
    r_txt = [strip_suffix(r, suffixes) for r in reference]
    ref_keys = {key(r) for r in reference} if key else set(r_txt)
    is_exact = [(key(p) if key else t) in ref_keys for p, t in zip(prompts, p_txt)]
    rest = [i for i, e in enumerate(is_exact) if not e]
    sim = [float("nan")] * len(prompts)
    if rest and r_txt and near != "none":
        texts = [p_txt[i] for i in rest]
        if near == "embedding":
            fn = embed if embed is not None else load_embedder(embedding_model)
            best = _max_cosine(fn(texts), fn(r_txt)).tolist()
        elif near == "minhash":
            best = _minhash_similarity(texts, r_txt, threshold, num_perm, shingle)
        else:
            raise OpdlensError(f"near must be 'embedding', 'minhash' or 'none', got {near!r}")
        for i, s in zip(rest, best):
            sim[i] = float(s)
    is_near = [not e and s >= threshold for e, s in zip(is_exact, sim)]  # NaN >= x is False
    return PromptMatch(is_exact, is_near, sim)


def read_prompts(path: str | Path, what: str = "prompt file") -> list[str]:
    """Prompts of a file: JSONL or Parquet rows with a ``prompt`` (a string, or a chat list as in
    verl's parquet files: the first message's ``content``) or ``question`` field; other files,
    one prompt a line."""
    p = Path(path)
    if not p.is_file():
        raise OpdlensError(f"{what}: {p} does not exist")
    if p.suffix.lower() in (".jsonl", ".parquet", ".pq"):
        from opdlens.tasks.local import read_rows

        out = []
        for num, row in read_rows(p):
            val = row.get("prompt", row.get("question"))
            if isinstance(val, (list, tuple)) and val and isinstance(val[0], dict):
                val = val[0].get("content")
            if not isinstance(val, str):
                raise OpdlensError(f"{p}: row {num}: no 'prompt' (text or chat list) or 'question' field")
            out.append(val)
        return out
    return [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
