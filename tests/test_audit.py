"""The loss audit (opdlens.audit) on the synthetic DP oracle: the audit of the full reverse KL is
the run's align_gkd, of Dr. GRPO its align_drgrpo (and MiniLLM its align_minillm), under both
restrictions and both estimators; sampled-token expectations; the no-op flag; user losses."""

from __future__ import annotations

import numpy as np
import pytest

from opdlens.audit.losses import select_losses
from opdlens.audit.run import audit_nodes
from opdlens.diagnose.signals import SignalConfig
from tests.helpers import SyntheticFactory, one_thread

RUN_METRIC = {"full[T=1]": "align_gkd", "drgrpo": "align_drgrpo", "minillm": "align_minillm"}


def oracle_run(tmp_path, restriction="renormalize", estimator="posterior_mean", n_questions=1):
    f = SyntheticFactory(n_questions=n_questions)
    f.options = f.options.model_copy(
        update={"signals": SignalConfig(min_visits=10, restriction=restriction, alignment_estimator=estimator)}
    )
    diag, envs = f(str(tmp_path / "run"))
    diag.run(envs)
    return diag, envs


@pytest.mark.parametrize("restriction", ["renormalize", "literal"])
@pytest.mark.parametrize("estimator", ["plugin", "posterior_mean"])
def test_audit_reproduces_the_runs_alignment(tmp_path, restriction, estimator):
    with one_thread():
        diag, envs = oracle_run(tmp_path, restriction, estimator)
        losses = select_losses(list(RUN_METRIC))
        audit = audit_nodes(diag, envs, losses)
    run = diag.store.read_all("nodes")
    run = run[run["valid"].astype(bool)]
    keys = ["teacher", "question_id", "path_id", "node"]
    assert len(run) > 10
    for loss, metric in RUN_METRIC.items():
        a = audit[audit["loss"] == loss].merge(run[[*keys, metric]], on=keys, validate="1:1")
        assert len(a) == len(run)
        x, y = a["align"].to_numpy(dtype=float), a[metric].to_numpy(dtype=float)
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
        np.testing.assert_allclose(x[np.isfinite(x)], y[np.isfinite(y)], atol=1e-6, rtol=0, err_msg=loss)
        assert np.isfinite(x).sum() > 10
