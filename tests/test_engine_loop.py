"""The engine's one decode loop, driven by a scripted decode state (no real model): stopping at
EOS, the length cap, compaction of finished rows, padding rows of uneven grids, early exit,
and the engine's settings (EngineConfig)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from opdlens.errors import OpdlensError
from opdlens.models import tiny_random_policy
from opdlens.rollout import EngineConfig, TorchEngine
from opdlens.rollout.decode import Job, Prefill

V, EOS = 16, 0


def script(p: int, s: int, t: int, stop: dict[tuple[int, int], int]) -> int:
    """Token that sample ``s`` of prefix ``p`` emits at step ``t`` (EOS at its stop step, >= 1);
    step 0's token comes from the prefix's logits, the same for all its samples."""
    return EOS if stop.get((p, s)) == t else 1 + (3 * p + (s + t if t else 0)) % (V - 1)


def one_hot(tokens: list[int]) -> torch.Tensor:
    """Logits that make sampling deterministic: the token's log-prob is ~0, the others ~-1e4."""
    out = torch.full((len(tokens), V), -1e4)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
    return out


class ScriptedState:
    """A decode state whose logits follow :func:`script`; it checks that the loop feeds back the
    tokens of the rows it holds, in their order, after every compaction."""

    def __init__(self, batch: list[Job], stop: dict[tuple[int, int], int], log: dict[str, Any]) -> None:
        R = max(j.rows for j in batch)
        # (prefix, sample) of each grid row; padding rows (r >= rows) are (-1, -1)
        self.rows = [(j.prefix, j.first + r) if r < j.rows else (-1, -1) for j in batch for r in range(R)]
        self.stop, self.log = stop, log

    def _tok(self, row: tuple[int, int], t: int) -> int:
        return EOS if row[0] < 0 else script(*row, t, self.stop)

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        live = [i for i, r in enumerate(self.rows) if r[0] >= 0 and all(self._tok(r, u) != EOS for u in range(t))]
        for i in live:  # rows still running were fed back their own token
            assert int(tok[i]) == self._tok(self.rows[i], t), (t, self.rows[i])
        self.log["rows_per_step"].append(len(self.rows))
        return one_hot([self._tok(r, t + 1) for r in self.rows])

    def compact(self, alive: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = alive.nonzero()[:, 0]
        assert all(self._tok(self.rows[i], u) != EOS for i in keep.tolist() for u in range(t + 1))
        self.rows = [self.rows[i] for i in keep.tolist()]
        self.log["compactions"].append((t, len(alive), len(keep)))
        return keep, torch.zeros(len(keep), dtype=torch.bool)


def scripted_engine(stop: dict[tuple[int, int], int], **kw: Any) -> tuple[TorchEngine, dict[str, Any]]:
    pol = tiny_random_policy(seed=0, vocab_size=V)
    eng = TorchEngine(pol.model, [EOS], pol.pad_token_id, "cpu", **kw)
    log: dict[str, Any] = {"rows_per_step": [], "compactions": []}

    def prefill(seqs: list[list[int]], ids: list[int]) -> dict[int, Prefill]:
        eng.stats["prefills"] += len(ids)  # the first token is the same for all rows of a prefix
        return {i: Prefill(len(s), one_hot([script(i, 0, 0, {})])[0]) for i, s in zip(ids, seqs)}

    eng._prefill = prefill  # type: ignore[method-assign]
    eng._state = lambda batch, prefills, max_new: (  # type: ignore[method-assign]
        ScriptedState(batch, stop, log),
        batch,
        max(j.rows for j in batch),
    )
    return eng, log


def test_rows_stop_at_eos_or_cap_and_finished_rows_are_compacted() -> None:
    n, max_new = 8, 10
    stop = {(0, s): s + 1 for s in range(6)}  # samples 0..5 of prefix 0 stop at steps 1..6; 6, 7 run to the cap
    eng, log = scripted_engine(stop, compact_below=0.5)
    (cs,) = eng.sample([[1, 2]], n, max_new, seed=0)
    for s, c in enumerate(cs):
        expect = [script(0, s, t, stop) for t in range(stop.get((0, s), max_new - 1) + 1)]
        assert c.tokens == expect and c.finished == ((0, s) in stop)
        assert c.logprobs == pytest.approx([0.0] * len(expect), abs=1e-3)
    # sample s finishes at step s + 1: after step t, 8 - t rows live. Step 4: 4 of 8 live (<= 0.5)
    # -> 4 rows; step 6: 2 of 4 live -> 2 rows. Rows sampled: 8 at step 0, then those fed back.
    assert log["compactions"] == [(4, 8, 4), (6, 4, 2)]
    assert log["rows_per_step"] == [8, 8, 8, 8, 4, 4, 2, 2, 2]
    assert eng.stats["row_steps"] == 8 + sum(log["rows_per_step"])
    assert eng.stats["decode_steps"] == max_new


def test_all_finished_stops_early_and_sync_every_delays_the_check() -> None:
    stop = {(p, s): 2 for p in range(2) for s in range(3)}
    eng, log = scripted_engine(stop, sync_every=1)
    res = eng.sample([[1], [2, 3]], 3, 20, seed=0)
    assert all(c.finished and len(c.tokens) == 3 for cs in res for c in cs)
    assert eng.stats["decode_steps"] == 3  # steps 0, 1, 2, then every row is done
    eng4, _ = scripted_engine(stop, sync_every=4)
    eng4.sample([[1], [2, 3]], 3, 20, seed=0)
    assert eng4.stats["decode_steps"] == 4  # the host looks only every 4 steps
    assert [[c.tokens for c in cs] for cs in eng4.sample([[1], [2, 3]], 3, 20, seed=0)] == [
        [c.tokens for c in cs] for cs in res
    ]


def test_uneven_jobs_pad_the_grid_and_padding_never_reaches_results() -> None:
    # 3 prefixes x 5 samples, at most 4 rows per batch: jobs of 4 + 1 rows; a grid holding a
    # 1-row job next to a 4-row one has padding rows, which must not reach any completion
    stop = {(p, s): 1 + (p + s) % 4 for p in range(3) for s in range(5)}
    eng, _ = scripted_engine(stop, max_batch_rows=4)
    res = eng.sample([[1], [2], [3]], 5, 6, seed=0)
    assert eng.stats["batches"] >= 3
    for p, cs in enumerate(res):
        assert len(cs) == 5
        for s, c in enumerate(cs):
            assert c.tokens == [script(p, s, t, stop) for t in range(stop[(p, s)] + 1)]


def test_engine_config_fields_and_overrides() -> None:
    pol = tiny_random_policy(seed=0, vocab_size=V)
    cfg = EngineConfig(max_batch_rows=7, compact_below=0.25)
    eng = TorchEngine(pol.model, [EOS], pol.pad_token_id, "cpu", cfg, sync_every=3)
    assert (eng.config.max_batch_rows, eng.config.compact_below, eng.sync_every) == (7, 0.25, 3)
    assert (eng.backend, eng.kernels, eng.sampler, eng.cuda_graphs) == ("fused", "torch", "torch", False)
    assert all(f.description for f in EngineConfig.model_fields.values())
    with pytest.raises(OpdlensError, match="max_batch_rows"):
        TorchEngine(pol.model, [EOS], pol.pad_token_id, "cpu", max_batch_rows=0)
    with pytest.raises(OpdlensError, match="kernel"):
        TorchEngine(pol.model, [EOS], pol.pad_token_id, "cpu", kernel="triton")
    with pytest.raises(OpdlensError, match="CUDA"):
        TorchEngine(pol.model, [EOS], pol.pad_token_id, "cpu", sampler="triton")


def test_triton_grid_rounds_shapes_up_so_they_recur() -> None:
    from opdlens.rollout.decode import TorchState
    from opdlens.rollout.triton_state import TritonState

    batch = [Job(0, 0, 99), Job(1, 0, 97), Job(2, 0, 3)]
    grid, R = TritonState.grid(batch)
    assert R == 112 and grid == batch  # 99 rows -> a multiple of 128 / 8; 3 prefixes stay 3
    grid, R = TritonState.grid([Job(i, 0, 5) for i in range(19)])
    assert (len(grid), R) == (20, 5) and all(j.rows == 0 and j.prefix == 0 for j in grid[19:])
    assert TorchState.grid(batch) == (batch, 99)  # the torch kernels keep exact shapes (CPU samples unchanged)
    for rows in range(1, 300):
        r = TritonState.grid([Job(0, 0, rows)])[1]
        assert rows <= r < 1.25 * rows


def test_diagnose_config_engine_block_reaches_the_student_engine() -> None:
    from opdlens.diagnose.config import DiagnoseConfig

    cfg = DiagnoseConfig(engine={"max_batch_rows": 7, "compact_below": 0.3})
    pol = tiny_random_policy(seed=0, vocab_size=V)
    pol.use_engine_config(cfg.engine)
    assert (pol.engine.config.max_batch_rows, pol.engine.config.compact_below) == (7, 0.3)
    with pytest.raises(OpdlensError, match="max_batch_row"):
        from opdlens.config import validate_config

        validate_config(DiagnoseConfig, {"engine": {"max_batch_row": 7}}, "test")


def test_frozen_models_share_their_weights_with_the_fused_tensors():
    """Fusing q|k|v and gate|up costs no memory for a frozen model (a 32B summariser would not
    fit an 80 GB GPU with a second copy); a model being trained keeps its own parameters."""
    from opdlens.rollout.model import FusedWeights

    x = torch.tensor([[1, 2, 3]])
    for frozen in (False, True):
        pol = tiny_random_policy(seed=0, vocab_size=64, model_type="qwen2")  # qwen2: q/k/v biases too
        pol.model.requires_grad_(not frozen)
        before = [p.detach().clone() for p in pol.model.parameters()]
        ref = pol.model(x).logits
        w = FusedWeights(pol.model)
        layer = pol.model.model.layers[0]
        shares = (
            layer.mlp.gate_proj.weight.data_ptr() == w.gu_w[0].data_ptr()
            and layer.self_attn.q_proj.bias.data_ptr() == w.qkv_b[0].data_ptr()
        )
        assert shares == frozen
        assert all(torch.equal(a, b) for a, b in zip(before, pol.model.parameters()))
        assert torch.equal(pol.model(x).logits, ref)
        w.refresh()
        assert w.generation == 1  # aliasing is not a change of the weights
