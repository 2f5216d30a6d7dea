"""Shared test helpers: simulated kills, tiny random-weight policies for the OPD tests, and the
synthetic-oracle worker factory of the Ray tests. They live here, not in the package, because
nothing but the tests (and ``tests/test_distributed.py``'s Ray workers) uses them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.questions import QuestionEnv
from opdlens.diagnose.schedule import Teacher
from opdlens.diagnose.signals import SignalConfig
from opdlens.diagnose.state import Runtime
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.targeting import TargetingConfig
from opdlens.diagnose.teachers import TeacherSpec


def kill_sampling_after(policy: Any, n_calls: int) -> None:
    """Make ``policy.sample`` raise ``KeyboardInterrupt`` (a simulated kill) on every call after the
    first ``n_calls``: the interrupted half of the resume tests."""
    real, calls = policy.sample, [0]

    def sample(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] > n_calls:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **kw)

    policy.sample = sample


def tiny_train_config(out_dir: Any, **kw: Any) -> Any:
    """A :class:`~opdlens.opd.config.TrainConfig` for the tiny CPU models: no progress bar, no
    tracker, no checkpoints or evaluation unless asked, k = metrics_k = 4; ``kw`` overrides any key
    (each test file sets its batch, budget, steps and lr)."""
    from opdlens.opd.config import TrainConfig

    base: dict[str, Any] = dict(
        batch_size=2,
        micro_batch=2,
        max_new_tokens=4,
        steps=2,
        lr=1e-3,
        eval_every=0,
        save_every=0,
        out_dir=out_dir,
        progress=False,
        report_to=[],
        k=4,
        metrics_k=4,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def tiny(seed: int, **kw: Any) -> Any:
    """A 2-layer, 32-wide random Llama on SmolLM2's tokenizer; ``init_std=0.5`` gives peaked,
    seed-dependent distributions (so student and teacher differ measurably)."""
    from opdlens.models import tiny_random_policy

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
    """The ``arith`` task and its first ``n`` questions of ``split`` (seed 0)."""
    from opdlens.tasks import get_task

    task = get_task("arith")
    return task, task.load(split=split, n=n, seed=0)


@dataclass
class SyntheticFactory:
    """A :class:`opdlens.diagnose.distributed.WorkerFactory` on the synthetic oracle
    (:mod:`opdlens.synthetic`): a random Markov student, a helpful and a harmful tilted teacher,
    ``n_questions`` questions. Every actor rebuilds the same policies from ``seed``, so a Ray run
    can be compared with a single-process one without models. ``prompt_lengths`` gives some
    questions prompt tokens (the synthetic model ignores them; with ``max_context`` they
    exercise the context-length skip).

    The Ray workers do not import this module (``tests`` need not be on their path): the Ray
    tests register it for pickling by value, so the class travels with the factory."""

    seed: int = 0
    horizon: int = 10
    n_questions: int = 2
    options: DiagnoseConfig = field(
        default_factory=lambda: DiagnoseConfig(
            rollouts_per_question=200,
            max_new_tokens=10,
            chunk_rollouts=100,
            targeting=TargetingConfig(first_window=2, per_window_gkd=2, per_window_gap=2, visit_target=60),
            signals=SignalConfig(min_visits=10),
        )
    )
    prompt_lengths: dict[str, int] = field(default_factory=dict)
    max_context: int | None = None  # the student's input limit (None: the synthetic policy's)

    def question_ids(self) -> list[str]:
        """``q0`` ... ``q<n-1>``."""
        return [f"q{i}" for i in range(self.n_questions)]

    def __call__(self, out_dir: str) -> tuple[Diagnosis, Sequence[QuestionEnv]]:
        """The diagnosis writing into ``out_dir`` and the questions' environments."""
        from opdlens.synthetic import SyntheticPolicy

        student = SyntheticPolicy.random(seed=self.seed, horizon=self.horizon)
        teachers = [
            Teacher(TeacherSpec(name="helpful", model="synthetic"), student.tilted(4.0, seed=self.seed + 1)),
            Teacher(TeacherSpec(name="harmful", model="synthetic"), student.tilted(-4.0, seed=self.seed + 2)),
        ]
        envs = [
            QuestionEnv(id=q, prompt_ids=[1] * self.prompt_lengths.get(q, 0), grade=student.is_success)
            for q in self.question_ids()
        ]
        runtime = Runtime(max_context=self.max_context)
        return Diagnosis(RunStore(out_dir), student, teachers, self.options, runtime, progress=False), envs
