"""Helpers of the OPD tests and smoke runs: tiny random-weight policies (SmolLM2 tokenizer), arith."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from opdlens.models import tiny_random_policy


def tiny(seed: int, **kw: Any) -> Any:
    """A 2-layer, 32-wide random Llama on SmolLM2's tokenizer; ``init_std=0.5`` gives peaked,
    seed-dependent distributions (so student and teacher differ measurably)."""
    kw.setdefault("init_std", 0.5)
    return tiny_random_policy(seed, **kw)


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run much faster single-threaded (and are not slowed by a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def arith_questions(n: int, split: str = "train") -> tuple[Any, list[Any]]:
    from opdlens.tasks import get_task

    task = get_task("arith")
    return task, task.load(split=split, n=n, seed=0)
