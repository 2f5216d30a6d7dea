"""Alignment during training (``audit_every: N`` with ``audit_probe: RUN`` in a train config).

The probe is a finished diagnose run: its paths, its tree (``P_succ``, hence the ideal gradient's
success rates, *fixed* from the probe run) and its teachers' log-probs along the paths, computed
once with the probe run's own models and contexts and kept on the CPU. Every N steps the current
student's log-probs along the same paths are recomputed and the training loss's gradient is
audited at the probe's valid nodes (:func:`opdlens.audit.gradients.audit_path`, the run's
restriction and estimator; the ideal gradient uses the *current* student's ``P_θ`` with the probe's
``P_succ``). Table 1's value per teacher (path → question → teacher) is logged as
``audit/align[<loss>][<teacher>]`` beside the training metrics (``metrics.jsonl``, TensorBoard).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from opdlens.audit.gradients import audit_path
from opdlens.audit.losses import AuditedLoss, registry_loss, with_outcome
from opdlens.audit.run import summarize
from opdlens.diagnose.schedule import by_model
from opdlens.diagnose.scoring import logprobs_along
from opdlens.errors import OpdlensError
from opdlens.sampling import support_log_probs


def training_loss(config: Any) -> AuditedLoss:
    """The audited form of a :class:`~opdlens.opd.config.TrainConfig`'s loss (its registry loss
    with its options, plus the outcome term when ``outcome_weight > 0``)."""
    loss = registry_loss(config.loss, config.loss_options(), config.loss)
    return with_outcome(loss, config.outcome_weight) if config.outcome_weight > 0 else loss


@dataclass
class _Path:
    question_id: str
    path_id: int
    correct: bool
    prompt_ids: list[int]
    tokens: list[int]
    stats: Any
    baseline: float
    teachers: dict[str, torch.Tensor]


class TrainingProbe:
    """The probe run's fixed part (see the module docstring); :meth:`measure` audits a student."""

    def __init__(self, diag: Any, envs: Sequence[Any], loss: AuditedLoss, unit: str = "path") -> None:
        self.loss, self.unit, self.signals = loss, unit, diag.config.signals
        cfg = diag.config  # P_θ as the probe run's signals take it (signals.student_distribution)
        self._sampling = (cfg.temperature, cfg.truncation) if cfg.signals.student_distribution == "sampling" else None
        store = diag.store
        envs = [e for e in envs if any(store.has(store.nodes_file(t.spec.name, e.id)) for t in diag.teachers)]
        if not envs:
            raise OpdlensError(f"audit_probe {store.root}: the run has no scored question")
        preps = {e.id: diag.prepare(e) for e in envs}
        paths: dict[tuple[str, int], _Path] = {}
        for group in by_model(diag.teachers):
            for env in envs:
                scored = [t for t in group if store.has(store.nodes_file(t.spec.name, env.id))]
                if not scored:
                    continue
                prep, rollouts = preps[env.id], store.read_rollouts(env.id)
                for rows, _, lpts in diag._scored_paths(env, prep, scored):
                    for i, row in enumerate(rows):
                        key = (env.id, int(row.path_id))
                        if key not in paths:
                            tokens = [int(x) for x in row.tokens]
                            paths[key] = _Path(
                                env.id,
                                int(row.path_id),
                                bool(row.correct),
                                list(env.prompt_ids),
                                tokens,
                                diag.path_stats(tokens, rollouts),
                                float(prep.initial.success_rate),
                                {},
                            )
                        for t, lpt in zip(scored, lpts):
                            paths[key].teachers[t.spec.name] = lpt[i].detach().float().cpu()
            for t in group:
                if not t.slot.resident:
                    t.slot.release()
        self.paths = list(paths.values())

    @classmethod
    def from_run(cls, run_dir: str | Path, loss: AuditedLoss, device: str | None = None) -> TrainingProbe:
        """The probe of a finished diagnose run directory (its models loaded from its config.yaml
        on ``device`` or the run's, used once, then freed with the diagnosis)."""
        from opdlens.diagnose.run import build_diagnosis
        from opdlens.report.run import load_run

        res = load_run(run_dir, finished=True, need_config=True)
        assert res.config is not None
        update: dict[str, object] = {"out_dir": str(res.root)}
        if device is not None:
            update["device"] = device
        diag, envs = build_diagnosis(res.config.model_copy(update=update), progress=False)
        done = set(res.questions["question_id"].astype(str))
        return cls(diag, [e for e in envs if e.id in done], loss, res.stat_unit)

    @torch.no_grad()
    def nodes(self, student: Any) -> pd.DataFrame:
        """The audit's node rows of ``student`` (a Policy) at the probe's valid nodes."""
        frames = []
        for p in self.paths:
            (lps,) = logprobs_along(student, [(p.prompt_ids, p.tokens)], False)
            lps = lps.detach().double().cpu()
            if self._sampling is not None:
                lps = support_log_probs(lps, *self._sampling)
            draws: dict[str, Any] = {}
            for teacher, lpt in p.teachers.items():
                res = audit_path(
                    p.stats, lps, lpt.double(), [self.loss], self.signals, baseline=p.baseline, draws_cache=draws
                )
                node = res.pop("_node")
                keep = np.flatnonzero(node["valid"])
                cols = res[self.loss.name]
                frames.append(
                    pd.DataFrame(
                        {
                            "teacher": teacher,
                            "question_id": p.question_id,
                            "path_id": p.path_id,
                            "path_correct": p.correct,
                            "node": keep,
                            "loss": self.loss.name,
                            "valid": True,
                            "align": cols["align"][keep],
                            "noop": cols["noop"][keep],
                            "norm": cols["norm"][keep],
                            "norm_ideal": node["norm_ideal"][keep],
                        }
                    )
                )
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def measure(self, student: Any) -> dict[str, float]:
        """``audit/align[<loss>][<teacher>]``: Table 1's value (all paths) per teacher, and
        ``audit/noop[<loss>][<teacher>]``: the share of no-op nodes."""
        nodes = self.nodes(student)
        if nodes.empty:
            return {}
        s = summarize(nodes, [self.loss], self.unit, ci="t")
        return {
            **{f"audit/align[{r.loss}][{r.teacher}]": float(r.mean) for r in s.losses.itertuples()},
            **{f"audit/noop[{r.loss}][{r.teacher}]": float(r.frac_noop) for r in s.losses.itertuples()},
        }
