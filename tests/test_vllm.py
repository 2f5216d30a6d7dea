"""VLLMEngine and ``rollout_engine: vllm`` against a strict fake of vLLM's offline API.

The fake behaves like vLLM (>= 0.10.2, V1 engine) in everything opdlens relies on:

* ``SamplingParams`` takes keyword arguments it knows only, rejects temperatures above 2,
  silently raises those below 0.01 to 0.01; a request with ``n`` samples and ``seed`` samples
  child ``j`` with seed ``seed + j`` (vLLM's ``ParentRequest``), seeds live in int64;
* sampling is Gumbel-max with noise drawn from (child seed, token position), as vLLM's sampler;
  the "model" is a fixed logit table indexed by the last token, so log-probs have an exact oracle;
  ``logprobs_mode="processed_logprobs"`` gives temperature-scaled log-probs, the default raw ones;
* ``LLM(...)`` accepts vLLM's dtype names only, rejects unknown arguments, and reserves
  ``gpu_memory_utilization * total`` of the device at start-up, refusing to start when that is
  more than the free memory; models loaded afterwards fail when the device is full.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from opdlens import models
from opdlens.config import validate_config
from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.run import vllm_engine
from opdlens.diagnose.teachers import TeacherSpec
from opdlens.errors import OpdlensError
from opdlens.models import tiny_random_policy
from opdlens.rollout import Engine, VLLMEngine
from opdlens.rollout import vllm_engine as ve

GIB = 1 << 30
VOCAB = 16
EOS = 0
# the fake model: next-token logits given the last token; peaky enough that EOS comes up
LOGITS = np.random.default_rng(0).normal(0.0, 2.0, size=(VOCAB, VOCAB))
VLLM_DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}
LOGPROBS_MODES = {"raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"}
INT64 = (-(2**63), 2**63 - 1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


class FakeOutOfMemory(RuntimeError):
    pass


@dataclass
class FakeDevice:
    """A GPU's memory: what vLLM reserves and the models loaded after it."""

    total: int = 80 * GIB
    used: int = 0
    held: dict[str, int] = field(default_factory=dict)

    @property
    def free(self) -> int:
        return self.total - self.used

    def allocate(self, what: str, nbytes: int) -> None:
        if nbytes > self.free:
            raise FakeOutOfMemory(
                f"CUDA out of memory loading {what}: {nbytes / GIB:.1f} GiB asked, {self.free / GIB:.1f} free"
            )
        self.used += nbytes
        self.held[what] = nbytes

    def release(self, what: str) -> None:
        self.used -= self.held.pop(what)


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None


@dataclass
class FakeOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]]
    finish_reason: str


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeOutput]


class FakeSamplingParams:
    """vLLM's ``SamplingParams`` validation for the fields opdlens may use (others: TypeError)."""

    def __init__(
        self,
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        max_tokens: int | None = 16,
        logprobs: int | None = None,
        detokenize: bool = True,
    ) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be at least 1, got {n}.")
        if temperature < 0.0 or temperature > 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {temperature}.")
        if 0 < temperature < 0.01:
            temperature = 0.01  # vLLM: a warning, and the temperature is raised
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        if logprobs is not None and logprobs != -1 and logprobs < 0:
            raise ValueError(f"logprobs must be non-negative or -1, got {logprobs}.")
        if not (top_k == -1 or top_k >= 0):
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}.")
        self.n, self.temperature, self.top_p, self.top_k = n, float(temperature), top_p, top_k
        self.min_p = min_p
        self.seed = None if seed == -1 else seed
        self.stop_token_ids = list(dict.fromkeys(stop_token_ids or []))
        self.max_tokens, self.logprobs, self.detokenize = max_tokens, logprobs, detokenize


class FakeLLM:
    """vLLM's offline ``LLM``: strict constructor, memory reservation, seeded Gumbel-max sampling."""

    device = FakeDevice()
    built: list[dict[str, Any]] = []

    def __init__(
        self,
        model: str,
        *,
        dtype: Any = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        logprobs_mode: str = "raw_logprobs",
        enable_prefix_caching: bool | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        if not (isinstance(dtype, torch.dtype) or dtype in VLLM_DTYPES):
            raise ValueError(f"Unknown dtype: {dtype!r}. Valid dtypes: {sorted(VLLM_DTYPES)}")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {sorted(LOGPROBS_MODES)}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        requested = int(gpu_memory_utilization * self.device.total)
        if self.device.free < requested:
            raise ValueError(
                f"Free memory on device ({self.device.free / GIB:.2f}/{self.device.total / GIB:.2f} GiB) on startup "
                f"is less than desired GPU memory utilization ({gpu_memory_utilization}, {requested / GIB:.2f} GiB)."
            )
        self.device.allocate("vllm", requested)
        self.logprobs_mode = logprobs_mode
        self.calls: list[tuple[list[Any], list[FakeSamplingParams]]] = []
        self.child_seeds: list[int] = []
        FakeLLM.built.append(
            dict(
                model=model,
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                logprobs_mode=logprobs_mode,
                enable_prefix_caching=enable_prefix_caching,
            )
        )

    def get_tokenizer(self) -> Any:
        return types.SimpleNamespace(eos_token_id=EOS)

    def generate(
        self, prompts: list[Any], sampling_params: Any = None, *, use_tqdm: bool = True
    ) -> list[FakeRequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        self.calls.append((prompts, params))
        results = []
        for prompt, sp in zip(prompts, params):
            if set(prompt) != {"prompt_token_ids"}:
                raise TypeError(f"expected a TokensPrompt dict, got {prompt!r}")
            ids = list(prompt["prompt_token_ids"])
            outs = []
            for j in range(sp.n):  # vLLM's parallel sampling: child j gets seed + j
                seed = int(np.random.default_rng().integers(0, 2**62)) if sp.seed is None else sp.seed + j
                if not INT64[0] <= seed <= INT64[1]:
                    raise OverflowError(f"seed {seed} does not fit vLLM's int64 seed buffer")
                self.child_seeds.append(seed)
                outs.append(self._sample(j, ids, sp, seed))
            results.append(FakeRequestOutput(ids, outs))
        return results

    def _sample(self, index: int, prompt: list[int], sp: FakeSamplingParams, seed: int) -> FakeOutput:
        tokens: list[int] = []
        lps: list[dict[int, FakeLogprob]] = []
        last, finish = prompt[-1], "length"
        for t in range(sp.max_tokens):
            # noise from (seed, position), as vLLM's Gumbel sampler (tl.randint(seed, pos))
            u = np.random.default_rng([seed % 2**64, len(prompt) + t]).random(VOCAB)
            gumbel = -np.log(-np.log(u + 1e-20) + 1e-20)
            scaled = LOGITS[last] / sp.temperature
            tok = int(np.argmax(scaled + gumbel))
            dist = _log_softmax(scaled if self.logprobs_mode == "processed_logprobs" else LOGITS[last])
            tokens.append(tok)
            lps.append({tok: FakeLogprob(float(dist[tok]), rank=1)})
            last = tok
            if tok in sp.stop_token_ids:
                finish = "stop"
                break
        return FakeOutput(index, tokens, lps, finish)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    """vLLM replaced by the fake, on a fresh 80 GiB device; the single-process variable unset."""
    monkeypatch.setattr(FakeLLM, "device", FakeDevice())
    monkeypatch.setattr(FakeLLM, "built", [])
    monkeypatch.setattr(
        ve, "_import_vllm", lambda: types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams)
    )
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "unset")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    return FakeLLM


def _engine(**kw: Any) -> VLLMEngine:
    return VLLMEngine.from_model("fake/model", eos_token_ids=[EOS], **kw)


# ---------------------------------------------------------------------------- requests and outputs
def test_requests_and_outputs_map_onto_vllm(fake_vllm: type[FakeLLM]) -> None:
    eng = _engine()
    assert isinstance(eng, Engine)
    res = eng.sample([[1, 2, 3], [4]], n=3, max_new_tokens=6, seed=10, temperature=0.8)
    ((prompts, params),) = eng.llm.calls
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    seeds = ve.request_seeds(10, 2, 3)
    assert [(p.n, p.max_tokens, p.temperature, p.seed, p.logprobs, p.stop_token_ids, p.detokenize) for p in params] == [
        (3, 6, 0.8, seeds[0], 0, [EOS], False),
        (3, 6, 0.8, seeds[1], 0, [EOS], False),
    ]
    assert [len(cs) for cs in res] == [3, 3]
    for prefix, cs in zip([[1, 2, 3], [4]], res):
        for c in cs:  # temperature-scaled log-probs (processed_logprobs), exact against the logit table
            ctx = [prefix[-1], *c.tokens[:-1]]
            ref = [_log_softmax(LOGITS[a] / 0.8)[b] for a, b in zip(ctx, c.tokens)]
            assert c.logprobs == pytest.approx(ref, abs=1e-12)
            assert c.finished == (c.tokens[-1] == EOS) and EOS not in c.tokens[:-1]
    assert {c.finished for cs in res for c in cs} == {True, False}
    assert fake_vllm.built[0]["logprobs_mode"] == "processed_logprobs"
    assert eng.sample([[1]], n=2, max_new_tokens=0, seed=0)[0][0].tokens == []
    with pytest.raises(OpdlensError, match="n .samples"):
        eng.sample([[1]], n=0, max_new_tokens=4, seed=0)


def test_same_call_same_samples_other_seed_other_samples(fake_vllm: type[FakeLLM]) -> None:
    eng = _engine()
    prefixes = [[1, 2], [3], [5, 6, 7]]
    a = eng.sample(prefixes, 4, 8, seed=3)
    assert [[c.tokens for c in cs] for cs in a] == [[c.tokens for c in cs] for cs in eng.sample(prefixes, 4, 8, seed=3)]
    assert [[c.tokens for c in cs] for cs in a] != [[c.tokens for c in cs] for cs in eng.sample(prefixes, 4, 8, seed=4)]


# ---------------------------------------------------------------------------- seeds (issue item 1)
@pytest.mark.parametrize("seed", [0, 1, 7, 2**62 + 5, 2**63 - 1, -3, 10**30])
@pytest.mark.parametrize(("n_prompts", "n"), [(1, 1), (5, 1), (1, 9), (37, 64), (300, 7)])
def test_request_seeds_give_every_prompt_sample_pair_its_own_seed(seed: int, n_prompts: int, n: int) -> None:
    """vLLM seeds sample j of prompt i with seed_i + j: those n_prompts * n values are all distinct
    (seed_i + j == seed_i' + j' with j, j' < n only when i == i' and j == j') and fit in int64."""
    seeds = ve.request_seeds(seed, n_prompts, n)
    child = np.add.outer(np.array(seeds, dtype=object), np.arange(n)).ravel()
    assert len(set(child.tolist())) == n_prompts * n
    assert 0 <= min(child) and max(child) < 2**63
    assert seeds == ve.request_seeds(seed, n_prompts, n)  # a function of the call's arguments only


@pytest.mark.parametrize("counts", [[1], [3, 1, 7], [64] * 5, [2, 9, 1, 1, 30]])
def test_request_seeds_with_per_prompt_counts(counts: list[int]) -> None:
    """One count per prompt: the seeds are base + the samples of the prompts before, so the
    seed_i + j (j < n_i) are base .. base + sum(n_i) - 1, each once; one count is the int call."""
    seeds = ve.request_seeds(4, len(counts), counts)
    child = sorted(s + j for s, n in zip(seeds, counts) for j in range(n))
    assert child == list(range(seeds[0], seeds[0] + sum(counts)))
    assert ve.request_seeds(4, 5, [7] * 5) == ve.request_seeds(4, 5, 7)


def test_per_prompt_counts_map_onto_vllm(fake_vllm: type[FakeLLM]) -> None:
    eng = _engine()
    res = eng.sample([[1, 2, 3], [4], [5]], n=[2, 5, 1], max_new_tokens=4, seed=1)
    ((_, params),) = eng.llm.calls
    assert [p.n for p in params] == [2, 5, 1] and [p.seed for p in params] == ve.request_seeds(1, 3, [2, 5, 1])
    assert [len(cs) for cs in res] == [2, 5, 1]


def test_truncation_maps_onto_vllm_sampling_params(fake_vllm: type[FakeLLM]) -> None:
    eng = _engine()
    eng.sample([[1, 2]], 2, 3, seed=1)
    eng.sample([[1, 2]], 2, 3, seed=1, top_p=0.9, top_k=5, min_p=0.05)
    (_, off), (_, on) = eng.llm.calls
    assert (off[0].top_p, off[0].top_k, off[0].min_p) == (1.0, -1, 0.0)  # vLLM's "off" for top_k is -1
    assert (on[0].top_p, on[0].top_k, on[0].min_p) == (0.9, 5, 0.05)
    with pytest.raises(OpdlensError, match="top_k"):
        eng.sample([[1, 2]], 2, 3, seed=1, top_k=-1)


def test_sibling_prefixes_do_not_share_noise(fake_vllm: type[FakeLLM]) -> None:
    """Identical sibling prefixes in one call: with seed + i per prompt, sample j of prompt 1 would be
    sample j + 1 of prompt 0 (same seed, same positions, same noise) and P_succ would be biased."""
    eng = _engine()
    res = eng.sample([[2, 3]] * 3, n=6, max_new_tokens=10, seed=0)
    assert len(set(eng.llm.child_seeds)) == 18
    toks = [[tuple(c.tokens) for c in cs] for cs in res]
    long = [(toks[i + 1][j], toks[i][j + 1]) for i in range(2) for j in range(5) if len(toks[i][j + 1]) >= 3]
    assert len(long) >= 4
    assert sum(a == b for a, b in long) == 0  # all of them equal under the collision


def test_calls_with_nearby_seeds_draw_disjoint_noise(fake_vllm: type[FakeLLM]) -> None:
    """Python API users pass seed=0, 1, 2...: those calls' (prompt, sample) seeds must not overlap."""
    eng = _engine()
    for s in range(10):
        eng.sample([[1], [2], [3]], n=4, max_new_tokens=2, seed=s)
    assert len(eng.llm.child_seeds) == len(set(eng.llm.child_seeds)) == 120


# ---------------------------------------------------------------------------- temperatures, dtype, options (items 3, 4)
def test_temperatures_vllm_would_change_are_refused(fake_vllm: type[FakeLLM]) -> None:
    eng = _engine()
    for t in (2.5, 0.005):
        with pytest.raises(OpdlensError, match=r"outside \[0.01, 2.0\]"):
            eng.sample([[1]], 2, 3, seed=0, temperature=t)
    for t in (0.01, 2.0):
        assert eng.sample([[1]], 2, 3, seed=0, temperature=t)[0][0].tokens
    assert [p[0].temperature for _, p in eng.llm.calls] == [0.01, 2.0]
    with pytest.raises(OpdlensError, match=r"temperature must be in \[0.01, 2.0\] with rollout_engine: vllm"):
        validate_config(DiagnoseConfig, {"rollout_engine": "vllm", "student": "x/y", "temperature": 2.5}, "test")
    with pytest.raises(OpdlensError, match="got 0.001"):
        validate_config(DiagnoseConfig, {"rollout_engine": "vllm", "student": "x/y", "temperature": 0.001}, "test")
    assert validate_config(DiagnoseConfig, {"temperature": 2.5}, "test").temperature == 2.5  # torch engine: any T > 0


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("bf16", "bfloat16"),
        ("fp16", "float16"),
        ("fp32", "float32"),
        ("bfloat16", "bfloat16"),
        ("float32", "float32"),
        (None, "auto"),
    ],
)
def test_config_dtype_reaches_vllm_under_its_name(fake_vllm: type[FakeLLM], ours: str | None, theirs: str) -> None:
    pol = tiny_random_policy(seed=0, vocab_size=VOCAB)
    vllm_engine(DiagnoseConfig(student="Qwen/Qwen3-0.6B", rollout_engine="vllm", dtype=ours), pol)
    assert fake_vllm.built[-1]["dtype"] == theirs


def test_vllm_dtype_names(fake_vllm: type[FakeLLM]) -> None:
    with pytest.raises(ValueError, match="Unknown dtype"):  # the fake is as strict as vLLM
        FakeLLM("m", dtype="bf16")
    with pytest.raises(TypeError):
        FakeLLM("m", not_an_engine_arg=1)
    assert ve.vllm_dtype("half") == "half" and ve.vllm_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(OpdlensError, match="unknown dtype 'int8'"):
        _engine(dtype="int8")


def test_single_process_mode_unless_chosen(fake_vllm: type[FakeLLM], monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    _engine()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setattr(FakeLLM, "device", FakeDevice())  # the first engine holds 90% of the other one
    _engine()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"


def test_rollout_engine_vllm_config_builds_the_student_sampler(fake_vllm: type[FakeLLM]) -> None:
    """``rollout_engine: vllm``: the student's samples come from vLLM (model id, dtype, seed, the
    student's EOS ids and the temperature-scaled log-probs mode passed on); scoring stays on HF."""
    pol = tiny_random_policy(seed=0, vocab_size=VOCAB)
    cfg = DiagnoseConfig(
        student="Qwen/Qwen3-0.6B",
        rollout_engine="vllm",
        dtype="bfloat16",
        seed=5,
        vllm_options={"gpu_memory_utilization": 0.5},
    )
    pol.engine = vllm_engine(cfg, pol)
    assert fake_vllm.built == [
        dict(
            model="Qwen/Qwen3-0.6B",
            gpu_memory_utilization=0.5,
            dtype="bfloat16",
            seed=5,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
        )
    ]
    res = pol.sample([[1, 2, 3]], n=4, max_new_tokens=5, seed=9, temperature=0.7)
    ((prompts, params),) = pol.engine.llm.calls
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}]
    assert (params[0].n, params[0].seed, params[0].temperature, params[0].stop_token_ids) == (
        4,
        ve.request_seeds(9, 1, 4)[0],
        0.7,
        sorted(pol.eos_token_ids),
    )
    assert [len(c.tokens) for c in res[0]] == [len(c.logprobs) for c in res[0]] and len(res[0]) == 4
    # the embedded GGUF is no vLLM model; a non-engine is refused
    with pytest.raises(OpdlensError, match="embedded 'smollm2'"):
        vllm_engine(DiagnoseConfig(rollout_engine="vllm"), pol)
    with pytest.raises(OpdlensError, match="not a rollout engine"):
        pol.engine = object()


# ---------------------------------------------------------------------------- memory (item 2)
SIZES = {
    "org/student-8b": 16 * GIB,
    "org/student-0.5b": 1 * GIB,
    "org/teacher-14b": 28 * GIB,
    "org/summ-1b": 2 * GIB,
    "org/huge-70b": 140 * GIB,
}


def _memory_config(student: str, **kw: Any) -> DiagnoseConfig:
    teachers = [
        TeacherSpec(name="self", model=None),
        TeacherSpec(name="big", model="org/teacher-14b"),
        TeacherSpec(name="big-1c", model="org/teacher-14b", context="1c"),
    ]
    kw.setdefault("schedule", "resident")  # every model stays loaded after vLLM starts
    return DiagnoseConfig(
        student=student, rollout_engine="vllm", device="cuda", teachers=teachers, summarizer="org/summ-1b", **kw
    )


@pytest.fixture
def cuda_device(fake_vllm: type[FakeLLM], monkeypatch: pytest.MonkeyPatch) -> FakeDevice:
    """The fake device as a CUDA device, model sizes from SIZES."""
    dev = fake_vllm.device
    monkeypatch.setattr(
        ve, "device_memory", lambda device: (dev.free, dev.total) if device.startswith("cuda") else None, raising=False
    )
    monkeypatch.setattr(models, "spec_weight_bytes", lambda spec, dtype: SIZES[spec])
    return dev


@pytest.mark.parametrize("student", ["org/student-8b", "org/student-0.5b"])
def test_vllm_leaves_room_for_the_models_loaded_after_it(cuda_device: FakeDevice, student: str) -> None:
    """The run builds vLLM right after the student, then loads the teachers and the summariser:
    with vLLM's default share (0.9) either vLLM cannot start (8B student) or the first teacher runs
    out of memory (0.5B student)."""
    pol = tiny_random_policy(seed=0, vocab_size=VOCAB)
    cuda_device.allocate("student (HF)", SIZES[student])
    vllm_engine(_memory_config(student), pol)
    for spec in ("org/teacher-14b", "org/summ-1b"):  # build_diagnosis loads these next (the 14B once)
        cuda_device.allocate(spec, SIZES[spec])
    assert cuda_device.free >= ve.SCORING_RESERVE * cuda_device.total - 0.001 * cuda_device.total
    share = FakeLLM.built[-1]["gpu_memory_utilization"]
    assert share == pytest.approx((80 - SIZES[student] / GIB - 30 - 8) / 80, abs=1e-3)
    assert share * cuda_device.total >= SIZES[student] + ve.MIN_VLLM_EXTRA_BYTES


def test_vllm_share_under_the_sequential_schedule_counts_the_largest_later_model(cuda_device: FakeDevice) -> None:
    """The sequential schedule loads one later model at a time and frees it: vLLM may keep
    everything but the largest of them."""
    pol = tiny_random_policy(seed=0, vocab_size=VOCAB)
    cuda_device.allocate("student (HF)", SIZES["org/student-0.5b"])
    vllm_engine(_memory_config("org/student-0.5b", schedule="sequential"), pol)
    share = FakeLLM.built[-1]["gpu_memory_utilization"]
    assert share == pytest.approx(
        (80 - SIZES["org/student-0.5b"] / GIB - SIZES["org/teacher-14b"] / GIB - 8) / 80, abs=1e-3
    )
    for spec in ("org/summ-1b", "org/teacher-14b"):  # the schedule's order: summariser, then teachers
        cuda_device.allocate(spec, SIZES[spec])
        assert cuda_device.free >= ve.SCORING_RESERVE * cuda_device.total - 0.001 * cuda_device.total
        cuda_device.release(spec)


def test_vllm_memory_errors_say_what_to_change(cuda_device: FakeDevice) -> None:
    pol = tiny_random_policy(seed=0, vocab_size=VOCAB)
    cuda_device.allocate("student (HF)", SIZES["org/student-8b"])
    huge = _memory_config("org/student-8b").model_copy(
        update={"teachers": [TeacherSpec(name="huge", model="org/huge-70b")]}
    )
    with pytest.raises(OpdlensError, match=r"vLLM does not fit.*still to load take 142.0 GiB.*rollout_engine: torch"):
        vllm_engine(huge, pol)
    with pytest.raises(
        OpdlensError, match=r"gpu_memory_utilization=0.9 reserves 72.0 GiB but only 34.0 GiB.*at most 0.42"
    ):
        vllm_engine(_memory_config("org/student-8b", vllm_options={"gpu_memory_utilization": 0.9}), pol)
    with pytest.raises(OpdlensError, match=r"gpu_memory_utilization=0.2 gives vLLM 16.0 GiB.*at least 0.21"):
        vllm_engine(_memory_config("org/student-8b", vllm_options={"gpu_memory_utilization": 0.2}), pol)
    assert FakeLLM.built == []
    vllm_engine(_memory_config("org/student-8b", vllm_options={"gpu_memory_utilization": 0.4}), pol)
    assert FakeLLM.built[-1]["gpu_memory_utilization"] == 0.4  # an explicit share that fits is kept


def test_no_share_computed_off_cuda(fake_vllm: type[FakeLLM]) -> None:
    pol = tiny_random_policy(seed=0, vocab_size=VOCAB)
    vllm_engine(DiagnoseConfig(student="x/y", rollout_engine="vllm", device="cpu"), pol)
    assert fake_vllm.built[-1]["gpu_memory_utilization"] == 0.9  # vLLM's own default
