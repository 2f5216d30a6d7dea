"""``arith``: generated arithmetic word problems with integer answers.

Questions are generated from ``(split, seed, difficulty settings)`` alone: no download, fully
reproducible, and the first ``n`` questions of a larger load are the same questions. Each
question keeps its expression in ``meta["expression"]`` (a Python expression whose value is the
answer) and the operands in ``meta["operands"]``.

Difficulty knob: ``difficulty`` picks a preset of :data:`LEVELS` (number of operands, magnitude
of the numbers, operations); ``n_operands``, ``max_value`` and ``ops`` override single settings.
``style="word"`` writes a short story ("Tom has 7 apples. He buys 5 more. ..."), ``style="expr"``
a bare expression ("What is 7 + 5?").

The default difficulty was calibrated on the embedded SmolLM2-135M-Instruct model so that its
success rate is clearly between 0 and 1 (``python -m opdlens.diagnose.calibrate``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from opdlens.errors import OpdlensError
from opdlens.tasks.base import MAX_QUESTIONS, Question, Task, generated_count, register_task


@dataclass(frozen=True)
class ArithLevel:
    """One difficulty preset: ``n_operands`` numbers (so ``n_operands - 1`` operations), numbers
    in ``[1, max_value]``, operations drawn from ``ops`` (a subset of ``"+-*"``)."""

    n_operands: int
    max_value: int
    ops: str


#: Difficulty presets, from trivial to hard for a 135M model.
LEVELS: dict[int, ArithLevel] = {
    1: ArithLevel(2, 5, "+"),
    2: ArithLevel(2, 10, "+"),
    3: ArithLevel(2, 10, "+-"),
    4: ArithLevel(3, 20, "+-"),
    5: ArithLevel(3, 50, "+-*"),
    6: ArithLevel(4, 100, "+-*"),
}

#: Default difficulty: the level at which SmolLM2-135M-Instruct succeeds on most questions
#: sometimes but not always (so the generation tree has both outcomes to compare). Easier numbers
#: do not raise its rate (the 135M model fails mostly by rambling) and harder levels can only
#: lower it. Measured in docs/RESULTS.md (``python -m opdlens.diagnose.calibrate``).
DEFAULT_DIFFICULTY = 2

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Lucy", "she"),
    ("Sam", "he"),
    ("Mia", "she"),
    ("Leo", "he"),
    ("Emma", "she"),
    ("Max", "he"),
    ("Zoe", "she"),
)
_ITEMS: tuple[str, ...] = (
    "apples",
    "marbles",
    "stickers",
    "books",
    "coins",
    "pencils",
    "cookies",
    "stamps",
    "cards",
    "shells",
)
_ADD = ("{P} buys {b} more.", "{P} finds {b} more.", "{P} gets {b} more from a friend.")
_SUB = ("{P} gives away {b}.", "{P} loses {b}.", "{P} gives {b} to a friend.")
_MUL = {2: "Then {p} doubles the number of {items}.", 3: "Then {p} triples the number of {items}."}

ARITH_INSTRUCTION = 'End your reply with "Answer: <number>".'

#: The splits of ``arith``: each is its own question stream (train and test share no generator).
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Largest ``n_operands`` (the number of operations of a question, generated one by one).
MAX_OPERANDS = 100
#: Largest ``max_value`` (operands beyond it would not fit a small model's vocabulary of numbers anyway).
MAX_VALUE = 10**12


def _int_arg(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer task argument in ``[lo, hi]`` (a clear error for another type or value)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpdlensError(f"arith {name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise OpdlensError(f"arith {name} must be in [{lo}, {hi}], got {value}")
    return value


@register_task
class ArithTask(Task):
    """Generated arithmetic word problems with integer answers (no download needed).

    Args:
        difficulty: a key of :data:`LEVELS` (default :data:`DEFAULT_DIFFICULTY`).
        n_operands: override the number of operands (>= 2).
        max_value: override the largest operand (>= 2).
        ops: override the operations, a non-empty subset of ``"+-*"``.
        style: ``"word"`` (story) or ``"expr"`` (bare expression).
        n_default: number of questions ``load()`` generates when ``n`` is None.
        instruction: the answer-format sentence appended to each prompt.
    """

    name: ClassVar[str] = "arith"
    answer_type = "int"
    max_new_tokens = 48

    def __init__(
        self,
        difficulty: int = DEFAULT_DIFFICULTY,
        n_operands: int | None = None,
        max_value: int | None = None,
        ops: str | None = None,
        style: str = "word",
        n_default: int = 100,
        instruction: str = ARITH_INSTRUCTION,
    ) -> None:
        if isinstance(difficulty, bool) or difficulty not in LEVELS:
            raise OpdlensError(f"arith difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
        base = LEVELS[difficulty]
        self.difficulty = difficulty
        self.n_operands = base.n_operands if n_operands is None else _int_arg("n_operands", n_operands, 2, MAX_OPERANDS)
        self.max_value = base.max_value if max_value is None else _int_arg("max_value", max_value, 2, MAX_VALUE)
        self.ops = base.ops if ops is None else ops
        if not isinstance(self.ops, str) or not self.ops or set(self.ops) - set("+-*"):
            raise OpdlensError(f"arith ops must be a non-empty subset of '+-*', got {self.ops!r}")
        if style not in ("word", "expr"):
            raise OpdlensError(f"arith style must be 'word' or 'expr', got {style!r}")
        _int_arg("n_default", n_default, 1, MAX_QUESTIONS)
        if not isinstance(instruction, str):
            raise OpdlensError(f"arith instruction must be a string, got {instruction!r}")
        self.style = style
        self.n_default = n_default
        self.instruction = instruction

    def load(self, split: str = "test", n: int | None = None, seed: int = 0, **kw: Any) -> list[Question]:
        """Generate ``n`` (default ``n_default``) questions for ``split`` and ``seed``.

        Different splits give different question streams, so ``train`` and ``test`` do not share
        a generator; a given ``(split, seed, settings)`` always yields the same questions.
        """
        if kw:
            raise OpdlensError(f"task 'arith': unexpected load() arguments {sorted(kw)}")
        if split not in SPLITS:
            raise OpdlensError(f"task 'arith' has no split {split!r}; its splits are {', '.join(SPLITS)}")
        count = generated_count("arith", n, self.n_default)
        key = f"arith|{split}|{seed}|{self.n_operands}|{self.max_value}|{self.ops}|{self.style}"
        rng = random.Random(key)  # str seeds are hashed with SHA-512: stable across runs
        return [self._generate(rng, f"arith-{split}-{seed}-{i}") for i in range(count)]

    def _generate(self, rng: random.Random, qid: str) -> Question:
        m = self.max_value
        value = rng.randint(2, m)
        operands = [value]
        applied: list[str] = []
        expr = str(value)
        name, pron = rng.choice(_PEOPLE)
        items = rng.choice(_ITEMS)
        sentences = [f"{name} has {value} {items}."]
        for _ in range(self.n_operands - 1):
            op = rng.choice(self.ops)
            if op == "-" and value < 2:
                op = "+" if "+" in self.ops else "*"
            if op == "*" and self.style == "word" and value * 3 > 10 * m:
                # keep stories' numbers readable: fall back to another operation
                op = "-" if "-" in self.ops and value >= 2 else "+"
            if op == "+":
                b = rng.randint(1, m)
                value += b
                expr = f"{expr} + {b}"
                sentences.append(rng.choice(_ADD).format(P=pron.capitalize(), b=b))
            elif op == "-":
                b = rng.randint(1, min(m, value - 1))
                value -= b
                expr = f"{expr} - {b}"
                sentences.append(rng.choice(_SUB).format(P=pron.capitalize(), b=b))
            else:
                b = rng.randint(2, 3) if self.style == "word" else rng.randint(2, min(9, m))
                value *= b
                expr = f"({expr}) * {b}" if any(o in "+-" for o in applied) else f"{expr} * {b}"
                sentences.append(_MUL.get(b, "").format(p=pron, items=items))
            operands.append(b)
            applied.append(op)
        if self.style == "word":
            sentences.append(f"How many {items} does {name} have now?")
            body = " ".join(sentences)
        else:
            body = f"What is {expr}?"
        prompt = f"{body}\n{self.instruction}" if self.instruction else body
        meta = {"expression": expr, "operands": operands, "ops": applied, "difficulty": self.difficulty}
        return Question(id=qid, prompt=prompt, answer=str(value), meta=meta)

    def __repr__(self) -> str:
        return (
            f"ArithTask(difficulty={self.difficulty}, n_operands={self.n_operands}, "
            f"max_value={self.max_value}, ops={self.ops!r}, style={self.style!r})"
        )
