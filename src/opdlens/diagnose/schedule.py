"""The model schedule: models loaded when a step needs them and freed after it (:class:`ModelSlot`),
teachers bound to their models, and the timing of each step (:class:`PhaseLog`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from opdlens.diagnose.questions import Messages
from opdlens.diagnose.teachers import TeacherSpec
from opdlens.policy import Policy

log = logging.getLogger(__name__)


def policy_max_context(policy: Any) -> int | None:
    """The longest input (prompt + generated tokens) a policy accepts: its ``max_context``
    attribute, else its Hugging Face config's ``max_position_embeddings``; None if unknown."""
    limit = getattr(policy, "max_context", None)
    if limit is None:
        cfg = getattr(getattr(policy, "model", None), "config", None)
        limit = getattr(cfg, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


class ModelSlot:
    """A model that the schedule loads on first use and frees after its phase.

    ``ModelSlot(load)`` calls ``load()`` on the first :meth:`get` and ``release(policy)`` on
    :meth:`release` (a later :meth:`get` loads it again); :meth:`fixed` wraps a policy that
    stays loaded (the student, test policies), whose :meth:`release` does nothing.
    """

    def __init__(
        self,
        load: Callable[[], Policy],
        release: Callable[[Policy], None] | None = None,
        name: str = "",
        max_context: int | None = None,
    ) -> None:
        self._load, self._release, self.name = load, release, name
        self._max_context = max_context
        self._policy: Policy | None = None
        self.loads = 0  # how often the model was loaded (the schedule's tests count it)

    @property
    def max_context(self) -> int | None:
        """The model's input limit: from the loaded model, else as known without loading it."""
        return policy_max_context(self._policy) if self._policy is not None else self._max_context

    @classmethod
    def fixed(cls, policy: Policy) -> ModelSlot:
        slot = cls(lambda: policy, None, getattr(policy, "name", ""), policy_max_context(policy))
        slot._policy = policy
        return slot

    @property
    def loaded(self) -> bool:
        return self._policy is not None

    @property
    def resident(self) -> bool:
        """Stays loaded for the whole run (:meth:`fixed`): never released."""
        return self._release is None

    def get(self) -> Policy:
        if self._policy is None:
            log.info("loading %s", self.name)
            self._policy = self._load()
            self.loads += 1
        return self._policy

    def release(self) -> None:
        if self._release is not None and self._policy is not None:
            log.info("freeing %s", self.name)
            policy, self._policy = self._policy, None
            self._release(policy)


class Teacher:
    """A teacher configuration bound to a model (a :class:`Policy`, or a :class:`ModelSlot` the
    schedule loads when needed); ``encode`` turns context messages into ids with the teacher's
    tokenizer, no model needed (None: the teacher sees the student's prompt ids, e.g. the
    synthetic oracle)."""

    def __init__(
        self, spec: TeacherSpec, policy: Policy | ModelSlot, encode: Callable[[Messages], list[int]] | None = None
    ) -> None:
        self.spec = spec
        self.slot = policy if isinstance(policy, ModelSlot) else ModelSlot.fixed(policy)
        self.encode = encode

    @property
    def policy(self) -> Policy:
        return self.slot.get()


def by_model(teachers: Sequence[Teacher]) -> list[list[Teacher]]:
    """Teachers grouped by the model they run on, in order of first appearance: the ones on
    resident models (the student, test policies) together, each scheduled model's together
    (the sequential schedule loads it once for its group)."""
    groups: dict[int, list[Teacher]] = {}
    for t in teachers:
        groups.setdefault(0 if t.slot.resident else id(t.slot), []).append(t)
    return list(groups.values())


class PhaseLog:
    """Wall seconds and peak GPU memory (GiB, 0 on CPU) of each step of a run, in order."""

    def __init__(self) -> None:
        self.entries: list[dict[str, object]] = []

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        self.entries.append({"phase": name, "seconds": time.perf_counter() - start, "peak_gpu_gib": peak})
        log.info("%s: %.1fs, peak GPU memory %.1f GiB", name, time.perf_counter() - start, peak)
