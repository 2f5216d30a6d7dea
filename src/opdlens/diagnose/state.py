"""What every step of a diagnosis shares: the run store, the student, the teachers, the run's
configuration and the models built for it (:class:`Runtime`). :class:`DiagnosisState` is the
base of the steps (phase 1, enrichment, scoring) that :class:`~opdlens.diagnose.diagnosis.Diagnosis`
combines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from opdlens.diagnose.questions import Messages, QuestionEnv
from opdlens.diagnose.sampling import Sampler
from opdlens.diagnose.schedule import ModelSlot, PhaseLog, Teacher
from opdlens.diagnose.store import RunStore
from opdlens.diagnose.tree import PathStats, RolloutSet, path_stats
from opdlens.policy import Policy
from opdlens.sampling import support_log_probs

if TYPE_CHECKING:
    from opdlens.diagnose.config import DiagnoseConfig


@dataclass
class Runtime:
    """The models and functions a run builds beside its configuration: the summariser (default:
    the student) with its chat encoder and decoder, the writer of 1c-ext solutions and its
    model (freed after its phase), and the student's input limit (None: the policy's own)."""

    summarizer: Policy | ModelSlot | None = None
    summarizer_encode: Callable[[Messages], list[int]] | None = None
    summarizer_decode: Callable[[Sequence[int]], str] | None = None
    #: for 1c-ext contexts: (question) -> (solution or None, reason when None)
    solution_writer: Callable[[QuestionEnv], tuple[str | None, str]] | None = None
    solution_slot: ModelSlot | None = None
    max_context: int | None = None


class DiagnosisState:
    """The attributes the steps of a diagnosis read (set by ``Diagnosis.__init__``)."""

    store: RunStore
    student: Policy
    teachers: list[Teacher]
    config: DiagnoseConfig
    runtime: Runtime
    sampler: Sampler
    phase: PhaseLog
    progress: bool
    skips: list[dict[str, str]]

    @property
    def driving(self) -> list[Teacher]:
        """The teachers whose priorities choose the targeted rollouts."""
        names = self.config.targeting_teachers
        return [t for t in self.teachers if names is None or t.spec.name in names]

    def student_signal_logprobs(self, lp: torch.Tensor) -> torch.Tensor:
        """The student's log-probs ``[L, V]`` as every signal and priority takes them
        (``signals.student_distribution``): the sampling distribution (temperature, then the
        run's truncation; tokens outside it at :data:`opdlens.sampling.LOG_ZERO`) or the model's."""
        cfg = self.config
        if cfg.signals.student_distribution == "model":
            return lp
        return support_log_probs(lp, cfg.temperature, cfg.truncation)

    def path_stats(self, path: Sequence[int], rollouts: RolloutSet) -> PathStats:
        return path_stats(path, rollouts, count_forced_at_ancestors=self.config.count_forced_at_ancestors)
