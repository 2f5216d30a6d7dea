"""Benchmark tasks loaded from the Hugging Face hub: ``boolq``, ``mmlu``, ``aime``.

Loading needs hub access (``datasets.load_dataset``). Without it, download the data elsewhere
(e.g. ``ds.to_json("boolq.jsonl")`` or ``ds.to_parquet(...)``) and either pass ``path=`` to the
same task (rows keep the hub's field names) or use the ``jsonl``/``parquet`` tasks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

from opdlens.errors import OpdlensError
from opdlens.tasks.answers import normalize_gold
from opdlens.tasks.base import LETTERS, Question, Task, format_choices, register_task, subsample
from opdlens.tasks.local import read_rows

_OFFLINE_HINTS = ("offline", "connect", "resolve", "network", "timed out", "timeout", "unreachable", "couldn't reach")


def _looks_offline(exc: BaseException) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "0",
        "",
    ):
        return True
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(h in text for h in _OFFLINE_HINTS)


#: Why a hub load failed when the hub cannot be reached (the model loader's words,
#: :func:`opdlens.models.sources._from_pretrained`).
HUB_UNREACHABLE = "the Hugging Face hub is unreachable or offline (HF_HUB_OFFLINE) and the local cache has no copy"


@contextmanager
def _offline() -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` in offline mode for the duration (only the local cache
    is read): what ``HF_HUB_OFFLINE=1`` does, for a hub found unreachable at run time. Without it
    ``load_dataset`` retries the network five times (about 30 s) before failing."""
    import datasets.config
    import huggingface_hub.constants as hc

    flags = [(m, n) for m in (datasets.config, hc) for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(m, n)]
    saved = [getattr(m, n) for m, n in flags]
    for m, n in flags:
        setattr(m, n, True)
    try:
        yield
    finally:
        for (m, n), value in zip(flags, saved):
            setattr(m, n, value)


def load_hf_rows(dataset: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset split as dicts; any failure is an :class:`OpdlensError` that says how
    to proceed without hub access. The hub's reachability is checked first, as the model loader
    checks it (:func:`opdlens.models.sources.hub_reachable`): offline, only the local cache is
    read, so a dataset that is not cached fails at once instead of after rounds of retries."""
    label = dataset + (f" ({config})" if config else "") + f" split {split!r}"
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise OpdlensError(
            f"could not load dataset {label}: the `datasets` package is not installed; "
            "install it, or pass a local jsonl/parquet via task jsonl"
        ) from e
    from opdlens.models import sources

    online = sources.hub_reachable()
    try:
        with nullcontext() if online else _offline():
            ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with a user-facing message
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        cause = HUB_UNREACHABLE if not online or _looks_offline(e) else "error"
        raise OpdlensError(
            f"could not load dataset {label}: {cause} ({detail}); "
            "download it and pass a local jsonl/parquet via task jsonl "
            "(or pass path=<file> to this task)"
        ) from e
    return [dict(r) for r in ds]


class HFTask(Task):
    """A task whose rows come from a hub dataset, or from a local file with the same fields.

    Args:
        dataset: hub dataset id (default: the class's ``default_dataset``).
        config: dataset configuration name.
        path: a local ``.jsonl``/``.parquet`` export of the dataset (then no hub is needed).
        instruction: replace the answer-format instruction.
    """

    default_dataset: ClassVar[str] = ""
    default_config: ClassVar[str | None] = None
    #: our split name -> the dataset's split name (e.g. BoolQ has no labelled test split)
    split_map: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        dataset: str | None = None,
        config: str | None = None,
        path: str | Path | None = None,
        instruction: str | None = None,
    ) -> None:
        self.dataset = dataset or self.default_dataset
        self.config = config if config is not None else self.default_config
        self.path = Path(path) if path is not None else None
        if instruction is not None:
            self.instruction = instruction

    def load(
        self,
        split: str = "test",
        n: int | None = None,
        seed: int = 0,
        path: str | Path | None = None,
        **kw: Any,
    ) -> list[Question]:
        """Questions of ``split`` (from the hub, or from ``path``); ``n``/``seed`` draw a seeded
        subset. Ids are ``"<task>-<split>-<row index>"`` unless the data has its own ids."""
        if kw:
            raise OpdlensError(f"task {self.name!r}: unexpected load() arguments {sorted(kw)}")
        p = Path(path) if path is not None else self.path
        if p is not None:
            numbered = read_rows(p)
            source = str(p)
        else:
            hf_split = self.split_map.get(split, split)
            numbered = list(enumerate(load_hf_rows(self.dataset, self.config, hf_split)))
            source = f"{self.dataset}:{hf_split}"
            if not numbered:
                raise OpdlensError(f"dataset {self.dataset} split {hf_split!r} is empty")
        chosen = subsample(numbered, n, seed)
        out = []
        for num, row in chosen:
            try:
                q = self.make_question(row, f"{self.name}-{split}-{num}")
            except (KeyError, ValueError, TypeError) as e:
                what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise OpdlensError(f"{source}: row {num}: {what}") from None
            q.meta.setdefault("source", source)
            q.meta.setdefault("row", num)
            out.append(q)
        return out

    def make_question(self, row: dict[str, Any], default_id: str) -> Question:
        """Build a question from one dataset row (``KeyError``/``ValueError`` for bad rows)."""
        raise NotImplementedError


@register_task
class BoolQTask(HFTask):
    """BoolQ (``google/boolq``): a passage and a yes/no question; answers ``True``/``False``.

    BoolQ's test split has no labels, so ``split="test"`` reads the validation split.
    """

    name: ClassVar[str] = "boolq"
    answer_type = "bool"
    instruction = 'Answer with "Answer: True" or "Answer: False".'
    max_new_tokens = 32
    default_dataset: ClassVar[str] = "google/boolq"
    split_map: ClassVar[dict[str, str]] = {"test": "validation"}

    def make_question(self, row: dict[str, Any], default_id: str) -> Question:
        question = str(row["question"]).strip()
        if not question:
            raise ValueError("field 'question' is empty")
        question = question[0].upper() + question[1:]
        if not question.endswith("?"):
            question += "?"
        passage = str(row.get("passage") or "").strip()
        answer = normalize_gold(row["answer"], "bool")
        body = f"{passage}\n\nQuestion: {question}" if passage else f"Question: {question}"
        return Question(id=str(row.get("id") or default_id), prompt=f"{body}\n{self.instruction}", answer=answer)


@register_task
class MMLUTask(HFTask):
    """MMLU (``cais/mmlu``, config ``all`` or a subject): four options, answer letter A-D."""

    name: ClassVar[str] = "mmlu"
    answer_type = "letter"
    instruction = 'Answer with the letter of the correct option, in the form "Answer: <letter>".'
    max_new_tokens = 32
    default_dataset: ClassVar[str] = "cais/mmlu"
    default_config: ClassVar[str | None] = "all"

    def make_question(self, row: dict[str, Any], default_id: str) -> Question:
        question = str(row["question"]).strip()
        choices = [str(c) for c in row["choices"]]
        if len(choices) < 2:
            raise ValueError(f"field 'choices' needs at least 2 options, got {len(choices)}")
        letters = LETTERS[: len(choices)]
        answer = normalize_gold(row["answer"], "letter", letters)
        prompt = f"{question}\n\n{format_choices(choices)}\n\n{self.instruction}"
        meta = {"subject": row.get("subject")}
        return Question(id=str(row.get("id") or default_id), prompt=prompt, answer=answer, choices=choices, meta=meta)


@register_task
class AIMETask(HFTask):
    """AIME 2025 (default ``math-ai/aime25``): integer answers 0-999, long reasoning.

    Answers are extracted from ``\\boxed{}`` (or "Answer: n", or the last number) and compared as
    integers, then with ``math_verify`` when the extracted answer is not a plain integer
    (e.g. ``\\frac{84}{1}``). Other AIME datasets work with ``dataset=`` (fields ``problem`` or
    ``question``, ``answer``; e.g. ``dataset="MathArena/aime_2025", split="train"``).
    """

    name: ClassVar[str] = "aime"
    answer_type = "math"
    instruction = "Please reason step by step, and put your final answer (an integer from 0 to 999) within \\boxed{}."
    max_new_tokens = 8192
    default_dataset: ClassVar[str] = "math-ai/aime25"

    def make_question(self, row: dict[str, Any], default_id: str) -> Question:
        text = next((row[k] for k in ("problem", "question", "Problem", "Question") if row.get(k)), None)
        if text is None:
            raise ValueError("no 'problem' or 'question' field")
        if "answer" not in row and "Answer" not in row:
            raise KeyError("answer")
        raw = row.get("answer", row.get("Answer"))
        answer = normalize_gold(raw, "int")
        if not 0 <= int(answer) <= 999:
            raise ValueError(f"field 'answer': AIME answers are integers 0-999, got {raw!r}")
        rid = next((row[k] for k in ("id", "problem_idx", "ID") if row.get(k) is not None), None)
        qid = f"aime-{rid}" if rid is not None else default_id
        return Question(id=qid, prompt=f"{str(text).strip()}\n\n{self.instruction}", answer=answer)
