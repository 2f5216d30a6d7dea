"""Checkpoints never execute code: a planted pickle is refused, a round trip restores everything."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from opdlens.errors import OpdlensError
from opdlens.opd import checkpoint as ckpt
from opdlens.opd.config import TrainConfig
from opdlens.opd.run import train
from opdlens.opd.trainer import OPDTrainer
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config

TASK, QS = arith_questions(8)


def _evil_pickle(path, target) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    path.write_bytes(pickle.dumps({"step": 5, "model": Evil()}))


def _cfg(tmp_path, **kw) -> TrainConfig:
    return tiny_train_config(tmp_path, **{"save_every": 1, **kw})


def test_planted_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    d = tmp_path / "checkpoints" / "step_0000005"
    d.mkdir(parents=True)
    marker = tmp_path / "pwned"
    _evil_pickle(d / "state.pt", marker)
    with one_thread(), pytest.raises(OpdlensError, match="pickle checkpoint.*does not load pickles"):
        train(_cfg(tmp_path), student=tiny(0), teacher=tiny(1), task=TASK, train_questions=QS, eval_questions=[])
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_a_clear_error(tmp_path):
    with one_thread():
        tr = OPDTrainer(_cfg(tmp_path), tiny(0), tiny(1), TASK, QS, [])
        tr.train_step()
        d = tr.save_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    _evil_pickle(d / "model.safetensors", marker)
    with pytest.raises(OpdlensError, match="corrupt or not an opdlens checkpoint"):
        ckpt.load_checkpoint(d, tiny(0).model, None)
    assert not marker.exists()


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    with one_thread():
        a = OPDTrainer(_cfg(tmp_path), tiny(0), tiny(1), TASK, QS, [])
        a.train_step()
        a.train_step()
        torch.manual_seed(123)
        d = a.save_checkpoint(tmp_path)
        after_save = torch.rand(3)
        b = OPDTrainer(_cfg(tmp_path), tiny(3), tiny(1), TASK, QS, [])
        assert b.load_checkpoint(d) == 2
    assert torch.equal(torch.rand(3), after_save)  # the torch RNG continues where it was saved
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), n
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for key, v in st.items():
            assert torch.equal(v, sb["state"][i][key]), (i, key)
    assert not (d / "state.pt").exists() and (d / "state.json").is_file()
