"""``yesno``: generated yes/no questions a small chat model answers sometimes right, sometimes not.

Questions are generated from ``(split, seed, kinds)`` alone: no download, fully reproducible, and
the first ``n`` questions of a larger load are the same questions. Each question is one of
several kinds (:data:`KINDS`), each with a reference answer of ``"True"`` (yes) or ``"False"``
(no), the two answers equally likely per kind:

``compare``   "Is 47 larger than 39?" (or "smaller than"; two distinct numbers in 1..99)
``parity``    "Is 12 an even number?" (or "odd"; 1..99)
``sum``       "Is 7 + 5 equal to 12?" (small numbers; a wrong sum is off by 1..3)
``category``  "Is a banana a fruit?" (a word of one of a few categories, asked about its own or another)
``alpha``     'Does "apple" come before "pear" in alphabetical order?' (distinct first letters)
``letters``   'Does the word "cat" start with the letter "c"?'

Answers are graded with the ``bool`` answer type of :mod:`opdlens.tasks.answers` ("Answer: yes",
"the answer is no", a leading "Yes, ...", true/false). ``meta["kind"]`` names the kind and
``meta["fact"]`` states the checked fact, so a report can split results by kind.

The default mix and instruction were calibrated on the embedded SmolLM2-135M-Instruct at T = 1
(``python -m opdlens.diagnose.calibrate --task yesno``; docs/RESULTS.md, "The yesno task"): it
succeeds on about 30 % of rollouts with most questions' rates strictly between 0 and 1, where on
``arith`` it succeeds on about 10 %, which puts every question in a study's hardest difficulty
bin. Its failures are mostly the wrong word or no yes/no at all (a third of its completions).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any, ClassVar

from opdlens.errors import OpdlensError
from opdlens.tasks.base import Question, Task, generated_count, register_task

#: The kinds of question, in the order a question's kind is drawn from.
KINDS: tuple[str, ...] = ("compare", "parity", "sum", "category", "alpha", "letters")

_CATEGORIES: dict[str, tuple[str, ...]] = {
    "an animal": ("dog", "cat", "horse", "tiger", "rabbit", "elephant", "lion", "cow"),
    "a fruit": ("banana", "apple", "orange", "grape", "cherry", "lemon", "peach", "mango"),
    "a color": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black"),
    "a vehicle": ("car", "bus", "truck", "bicycle", "train", "boat", "plane", "taxi"),
}
_WORDS: tuple[str, ...] = tuple(sorted({w for ws in _CATEGORIES.values() for w in ws}))

#: The splits and the share of the question space each one gets (by a hash of the question text).
SPLITS: dict[str, tuple[int, int]] = {"test": (0, 30), "validation": (30, 50), "train": (50, 100)}

YESNO_INSTRUCTION = "Answer yes or no."


def split_of(text: str) -> str:
    """The split a question text belongs to: its SHA-256 modulo 100 falls in that split's range
    of :data:`SPLITS` (so the splits are disjoint and fixed, whatever the seeds)."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@register_task
class YesNoTask(Task):
    """Generated yes/no questions of several kinds (no download needed).

    Args:
        kinds: the kinds of question to mix (a subset of :data:`KINDS`, as a list or a
            comma-separated string); default all of them, drawn uniformly.
        n_default: number of questions ``load()`` generates when ``n`` is None.
        instruction: the answer-format sentence appended to each prompt.
    """

    name: ClassVar[str] = "yesno"
    answer_type = "bool"
    max_new_tokens = 32

    def __init__(
        self,
        kinds: str | list[str] | tuple[str, ...] | None = None,
        n_default: int = 100,
        instruction: str = YESNO_INSTRUCTION,
    ) -> None:
        if kinds is None:
            chosen = list(KINDS)
        elif isinstance(kinds, str):
            chosen = [k.strip() for k in kinds.split(",") if k.strip()]
        else:
            chosen = [str(k).strip() for k in kinds]
        unknown = sorted(set(chosen) - set(KINDS))
        if unknown or not chosen:
            raise OpdlensError(f"yesno kinds must be a non-empty subset of {', '.join(KINDS)}; got {kinds!r}")
        if len(set(chosen)) != len(chosen):
            raise OpdlensError(f"yesno kinds repeat a kind: {kinds!r}")
        if n_default < 1:
            raise OpdlensError(f"yesno n_default must be >= 1, got {n_default}")
        self.kinds = tuple(chosen)
        self.n_default = n_default
        self.instruction = instruction

    def load(self, split: str = "test", n: int | None = None, seed: int = 0, **kw: Any) -> list[Question]:
        """Generate ``n`` (default ``n_default``) distinct questions for ``split`` and ``seed``.

        Splits are disjoint: a question's text decides its split (:func:`split_of`), and a
        split's loads keep only its own questions; a given ``(split, seed, kinds)`` always yields
        the same questions, the first ``n`` of a larger load included.
        """
        if kw:
            raise OpdlensError(f"task 'yesno': unexpected load() arguments {sorted(kw)}")
        if split not in SPLITS:
            raise OpdlensError(f"task 'yesno': unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        count = generated_count("yesno", n, self.n_default)
        rng = random.Random(f"yesno|{split}|{seed}|{','.join(self.kinds)}")  # str seeds: stable (SHA-512)
        seen: set[str] = set()
        out: list[Question] = []
        tries = 0
        while len(out) < count:
            tries += 1
            if tries > 1000 + 200 * count:  # the kinds' question spaces are finite
                raise OpdlensError(
                    f"yesno: cannot generate {count} distinct {split} questions of kinds {', '.join(self.kinds)}"
                )
            kind = rng.choice(self.kinds)
            yes = rng.random() < 0.5
            body, fact = _GENERATORS[kind](rng, yes)
            if body in seen or split_of(body) != split:
                continue
            seen.add(body)
            prompt = f"{body}\n{self.instruction}" if self.instruction else body
            meta = {"kind": kind, "fact": fact}
            out.append(Question(id=f"yesno-{split}-{seed}-{len(out)}", prompt=prompt, answer=str(yes), meta=meta))
        return out

    def __repr__(self) -> str:
        return f"YesNoTask(kinds={','.join(self.kinds)!r})"


# ---------------------------------------------------------------------------- kinds: (question, fact)
def _compare(rng: random.Random, yes: bool) -> tuple[str, str]:
    a, b = sorted(rng.sample(range(1, 100), 2))  # a < b
    if rng.random() < 0.5:  # "larger": yes iff the first is the larger one
        x, y = (b, a) if yes else (a, b)
        return f"Is {x} larger than {y}?", f"{max(a, b)} > {min(a, b)}"
    x, y = (a, b) if yes else (b, a)
    return f"Is {x} smaller than {y}?", f"{min(a, b)} < {max(a, b)}"


def _parity(rng: random.Random, yes: bool) -> tuple[str, str]:
    x = rng.randint(1, 99)
    word = "even" if x % 2 == 0 else "odd"
    asked = word if yes else ("odd" if word == "even" else "even")
    return f"Is {x} an {asked} number?", f"{x} is {word}"


def _sum(rng: random.Random, yes: bool) -> tuple[str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    c = a + b if yes else a + b + rng.choice((-3, -2, -1, 1, 2, 3))
    return f"Is {a} + {b} equal to {c}?", f"{a} + {b} = {a + b}"


def _category(rng: random.Random, yes: bool) -> tuple[str, str]:
    cats = sorted(_CATEGORIES)
    own = rng.choice(cats)
    word = rng.choice(_CATEGORIES[own])
    asked = own if yes else rng.choice([c for c in cats if c != own])
    return f"Is {_article(word)} {asked}?", f"{_article(word)} is {own}"


def _alpha(rng: random.Random, yes: bool) -> tuple[str, str]:
    while True:
        w1, w2 = rng.sample(_WORDS, 2)
        if w1[0] != w2[0]:
            break
    first, second = (w1, w2) if w1 < w2 else (w2, w1)
    x, y = (first, second) if yes else (second, first)
    return (
        f'Does the word "{x}" come before "{y}" in alphabetical order?',
        f'"{first}" comes before "{second}"',
    )


def _letters(rng: random.Random, yes: bool) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    letter = word[0] if yes else rng.choice([c for c in "abcdefghijklmnoprstw" if c != word[0]])
    return f'Does the word "{word}" start with the letter "{letter}"?', f'"{word}" starts with "{word[0]}"'


_GENERATORS: dict[str, Callable[[random.Random, bool], tuple[str, str]]] = {
    "compare": _compare,
    "parity": _parity,
    "sum": _sum,
    "category": _category,
    "alpha": _alpha,
    "letters": _letters,
}
