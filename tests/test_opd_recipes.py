"""Recipes: degeneracy filter, cold-start SFT on teacher rollouts, template selection by overlap."""

from __future__ import annotations

import pytest
import torch

from opdlens.errors import OpdlensError
from opdlens.opd.coldstart import cold_start_sft, is_degenerate
from opdlens.opd.recipes import select_template
from opdlens.policy import Completion
from tests.helpers import arith_questions, one_thread, tiny, tiny_train_config


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def test_is_degenerate():
    # the run rule alone (n-gram rule switched off by max_repeat_frac=1)
    assert is_degenerate([7] * 12, max_repeat_frac=1.0)
    assert not is_degenerate([7] * 11 + [3], max_repeat_frac=1.0)
    assert is_degenerate([7] * 11 + [3])  # ... but its 4-grams repeat: 1 - 2/9 = 0.78
    assert is_degenerate([1, 2, 3, 4, 5] * 4)  # repeated 4-grams: 1 - 5/17 = 0.71
    assert not is_degenerate(list(range(40)))
    assert is_degenerate([])
    assert not is_degenerate([1, 2, 3, 4, 5] * 2 + list(range(10, 30)))  # 1 - 23/27 = 0.15


class _Scripted:
    """Wraps a policy and replaces its sampling by fixed completions (to test the filter)."""

    def __init__(self, base, completions):
        self.base, self.completions = base, completions

    def __getattr__(self, name):
        return getattr(self.base, name)

    def sample(self, prefixes, n, max_new_tokens, *, seed, temperature=1.0):
        assert temperature == 0.7
        return [[self.completions[i % len(self.completions)] for _ in range(n)] for i in range(len(prefixes))]


def test_cold_start_filters_and_lowers_sft_loss():
    with one_thread():
        student, base_teacher = tiny(0, init_std=0.2), tiny(1, init_std=0.2)
        eos = min(student.eos_token_ids)
        good = Completion([11, 12, 13, 14, 15, eos], [0.0] * 6, finished=True)
        incomplete = Completion([11, 12, 13], [0.0] * 3, finished=False)
        looping = Completion([9] * 14 + [eos], [0.0] * 15, finished=True)
        teacher = _Scripted(base_teacher, [good, incomplete, looping, good])
        task, qs = arith_questions(8)
        w0 = student.model.lm_head.weight.detach().clone()
        res = cold_start_sft(student, teacher, qs, lr=1e-2, epochs=6, batch_size=4, max_new_tokens=16)
    assert (res.n_rollouts, res.n_incomplete, res.n_degenerate, res.n_kept) == (8, 2, 2, 4)
    assert all(y == good.tokens for _, y in res.kept)
    assert len(res.losses) == 6 and res.losses[-1] < 0.5 * res.losses[0]
    assert not torch.equal(w0, student.model.lm_head.weight)


def test_cold_start_all_filtered_is_an_error():
    with one_thread():
        student, base = tiny(0), tiny(1)
        bad = Completion([3, 4], [0.0, 0.0], finished=False)
        with pytest.raises(OpdlensError, match="all 2 teacher rollouts were filtered"):
            cold_start_sft(student, _Scripted(base, [bad]), arith_questions(2)[1])


def test_select_template_ranks_by_overlap():
    with one_thread():
        student = tiny(0, init_std=0.3)
        teacher = tiny(0, init_std=0.3)  # same weights: only the context differs
        _, qs = arith_questions(3)
        cands = {"same": "{prompt}", "prefixed": "Ignore this: zebra quartz {answer} " * 3 + "{prompt}"}
        scores = select_template(cands, student, teacher, qs, apply_to="teacher", n_rollouts=2, max_new_tokens=6, k=8)
    assert [s.name for s in scores] == ["same", "prefixed"]
    assert scores[0].overlap_ratio == pytest.approx(1.0)  # identical model and context
    assert scores[0].rkl == pytest.approx(0.0, abs=1e-5)
    assert scores[1].overlap_ratio < 0.95 and scores[1].rkl > 1e-3
    assert scores[0].n_tokens == scores[1].n_tokens > 0  # the same student rollouts, scored twice


# ---------------------------------------------------------------------------- prompt selection + stages
from opdlens.opd.prompts import (  # noqa: E402
    AUTHORS_SUFFIX,
    load_embedder,
    match_prompts,
    normalise_prompt,
    read_prompts,
    strip_suffix,
    teacher_aligned,
    without_matches,
)

BASE = (
    "A farmer has 17 sheep and buys 5 more at the market on a sunny Tuesday morning. How many sheep does he have now?"
)


def test_minhash_matching_exact_then_near_then_distinct():
    """Ours: normalised exact match, then MinHash Jaccard of word 3-grams."""
    prompts = [
        "a FARMER has 17 sheep, and buys 5 more at the market on a sunny tuesday morning; how many sheep does he have now",
        BASE.replace("sunny", "rainy"),  # one word changed: Jaccard of 3-gram shingles 16/22 words...
        "What is the capital of France?",
        BASE.replace("Tuesday", "Friday").replace("17", "18").replace("market", "fair"),
    ]
    m = match_prompts(prompts, [BASE], exact="normalised", near="minhash", threshold=0.5)
    assert normalise_prompt(prompts[0]) == normalise_prompt(BASE)
    assert m.exact == [True, False, False, False] and m.near == [False, True, False, False]
    assert without_matches(m) == [2, 3] and teacher_aligned(m) == [0, 1]
    # the near test is the MinHash estimate of the shingle Jaccard: 1-word edit of 21 words keeps 16/24 3-grams
    strict = match_prompts(prompts, [BASE], exact="normalised", near="minhash", threshold=0.9)
    assert (sum(strict.exact), sum(strict.near), without_matches(strict)) == (1, 0, [1, 2, 3])


# real prompts in the authors' two formats: DAPO-Math rows end with the instruction suffix,
# DeepMath questions are raw (extra_info.question)
DAPO = [
    "In triangle $ABC$, $AB = 13$, $BC = 14$ and $CA = 15$. Find the area of the triangle." + AUTHORS_SUFFIX,
    "Let $x$ be a positive real number such that $x + 1/x = 3$. Find $x^2 + 1/x^2$." + AUTHORS_SUFFIX,
    "How many positive divisors does $2024$ have?",  # a row without the suffix is kept as is
]
DEEPMATH = [
    "In triangle $ABC$, $AB = 13$, $BC = 14$ and $CA = 15$. Find the area of the triangle.",  # = DAPO[0] stripped
    "  How many positive divisors does $2024$ have?\n",  # = DAPO[2] up to white space
    "Let $x$ be a positive real number such that $x + 1/x = 3$. Find $x^2 + 1/x^2$." + AUTHORS_SUFFIX,
    "let $x$ be a positive real number such that $x + 1/x = 3$. find $x^2 + 1/x^2$.",  # case differs
    "Evaluate the integral $\\int_0^1 x^2 \\, dx$.",
]


def test_exact_match_strips_the_authors_suffix_on_real_prompts():
    assert AUTHORS_SUFFIX == " Please reason step by step, and put your final answer within \\boxed{}."
    assert strip_suffix(DAPO[0], [AUTHORS_SUFFIX]) == DEEPMATH[0]
    assert strip_suffix(DAPO[2], [AUTHORS_SUFFIX]) == DAPO[2]
    m = match_prompts(DEEPMATH, DAPO, suffixes=[AUTHORS_SUFFIX], exact="stripped", near="none")
    # the authors' exact match: equal strings after the suffix strip (case matters)
    assert m.exact == [True, True, True, False, False] and not any(m.near)
    assert teacher_aligned(m) == [0, 1, 2] and without_matches(m) == [3, 4]
    # without the strip only the suffixed DeepMath row and the white-space one match
    bare = match_prompts(DEEPMATH, DAPO, exact="stripped", near="none")
    assert bare.exact == [False, True, True, False, False]
    # ours, normalised: the case-changed row matches too
    loose = match_prompts(DEEPMATH, DAPO, suffixes=[AUTHORS_SUFFIX], exact="normalised", near="none")
    assert loose.exact == [True, True, True, True, False]


def test_embedding_near_match_at_the_threshold_with_an_injected_encoder():
    vecs = {"r": [1.0, 0.0], "a": [0.6, 0.8], "b": [0.59, 0.8073], "c": [0.0, 1.0]}  # cosines 0.6, 0.59, 0
    seen = []

    def embed(texts):
        seen.append(list(texts))
        return torch.tensor([vecs[t] for t in texts])

    m = match_prompts(
        ["a", "b", "c", "r" + AUTHORS_SUFFIX], ["r"], suffixes=[AUTHORS_SUFFIX], threshold=0.6, embed=embed
    )
    assert m.exact == [False, False, False, True]
    assert m.near == [True, False, False, False]  # cosine >= 0.6 is a duplicate, as the authors'
    assert m.similarity[0] == pytest.approx(0.6) and m.similarity[3] != m.similarity[3]  # NaN: exact, not embedded
    assert seen == [["a", "b", "c"], ["r"]]  # only the non-exact prompts are embedded, suffixes stripped
    assert teacher_aligned(m) == [0, 3] and without_matches(m) == [1, 2]


def test_embedder_loads_a_random_encoder_the_sentence_transformers_way(tmp_path):
    pol = tiny(0)
    d = tmp_path / "emb"
    pol.model.save_pretrained(d)
    pol.tokenizer.save_pretrained(d)
    (d / "sentence_bert_config.json").write_text('{"max_seq_length": 8, "do_lower_case": false}')
    embed = load_embedder(str(d), device="cpu")
    texts = [BASE + " Be brief.", "What is the capital of France?", BASE]
    e = embed(texts)
    assert e.shape == (3, pol.model.config.hidden_size)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    # mean pooling over the first max_seq_length tokens of the last hidden states
    enc = pol.tokenizer(texts[1:2], truncation=True, max_length=8, return_tensors="pt")
    from transformers import AutoModel

    with torch.no_grad():
        h = AutoModel.from_pretrained(d)(**enc).last_hidden_state[0]
    assert torch.allclose(e[1], torch.nn.functional.normalize(h.mean(0), dim=0), atol=1e-5)
    # truncation at 8 tokens: BASE and BASE + " Be brief." embed alike
    assert torch.allclose(e[0], e[2], atol=1e-6)


def test_prompt_stages_select_the_teacher_aligned_set_or_its_control(tmp_path):
    from opdlens.opd.config import TrainConfig
    from opdlens.opd.presets import PROMPT_MATCH_PAPER
    from opdlens.opd.recipes import run_stages

    task, qs = arith_questions(6)
    ref = tmp_path / "teacher.jsonl"
    ref.write_text("".join(__import__("json").dumps({"prompt": q.prompt + AUTHORS_SUFFIX}) + "\n" for q in qs[:2]))
    assert read_prompts(ref) == [q.prompt + AUTHORS_SUFFIX for q in qs[:2]]
    exact_only = {"reference": str(ref), "recipe": "paper", "near": "none"}
    base = dict(device="cpu", progress=False, tensorboard=False)
    cfg = TrainConfig(select_teacher_prompts=exact_only, **base)
    assert cfg.select_teacher_prompts.suffixes == [AUTHORS_SUFFIX]  # recipe: paper
    assert {k: getattr(cfg.select_teacher_prompts, k) for k in PROMPT_MATCH_PAPER} == {
        k: v.value for k, v in PROMPT_MATCH_PAPER.items() if k != "near"
    } | {"near": "none"}
    assert (
        TrainConfig(drop_duplicate_prompts={"reference": "x", "recipe": "paper"}).drop_duplicate_prompts.threshold
        == 0.6
    )
    _, aligned, log = run_stages(cfg, None, None, task, list(qs), tmp_path)
    assert [q.id for q in aligned] == [q.id for q in qs[:2]]
    assert log == {
        "select_teacher_prompts_exact": 2,
        "select_teacher_prompts_near": 0,
        "select_teacher_prompts_kept": 2,
    }
    cfg = TrainConfig(drop_duplicate_prompts=exact_only, **base)
    _, control, log = run_stages(cfg, None, None, task, list(qs), tmp_path)
    assert [q.id for q in control] == [q.id for q in qs[2:]]  # the complement
    assert log["drop_duplicate_prompts_kept"] == 4
    with pytest.raises(ValueError, match="drop_duplicate_prompts"):  # pydantic wraps it; from_yaml: one line
        TrainConfig(prompt_selection={"against": str(ref)})


def test_stages_run_from_the_config_and_replay_on_resume(tmp_path):
    from opdlens.opd.run import train

    task, qs = arith_questions(6)
    ref = tmp_path / "ref.jsonl"
    ref.write_text(__import__("json").dumps({"prompt": qs[0].prompt}) + "\n")
    cfg = tiny_train_config(
        tmp_path / "run",
        save_every=1,
        drop_duplicate_prompts={"reference": str(ref)},
        template_selection={
            "candidates": {"plain": "{prompt}", "noisy": "zebra quartz " * 4 + "{prompt}"},
            "apply_to": "teacher",
            "questions": 2,
            "n_rollouts": 1,
            "max_new_tokens": 4,
        },
        cold_start={"temperature": 0.7, "max_new_tokens": 4, "lr": 1e-3, "batch_size": 2, "questions": 2},
    )
    with one_thread():
        student = tiny(0, init_std=0.3)
        teacher = _Scripted(
            tiny(0, init_std=0.3), [Completion([11, 12, 13, min(student.eos_token_ids)], [0.0] * 4, True)]
        )
        teacher.model = teacher.base.model
        res = train(
            cfg, student=student, teacher=teacher, task=task, train_questions=qs, eval_questions=[], stop_after=1
        )
    stages = __import__("json").loads((tmp_path / "run" / "stages.json").read_text())
    assert stages["log"]["drop_duplicate_prompts_exact"] == 1 and stages["log"]["drop_duplicate_prompts_kept"] == 5
    assert stages["log"]["template_selected"] == "plain" and stages["templates"] == {"teacher_template": "{prompt}"}
    assert stages["log"]["cold_start_n_kept"] == 2
    assert qs[0].id not in stages["kept_question_ids"]
    with one_thread():
        res2 = train(
            cfg,
            student=tiny(0, init_std=0.3),
            teacher=tiny(0, init_std=0.3),
            task=task,
            train_questions=qs,
            eval_questions=[],
        )
    assert res.last_step == 1 and res2.resumed_from == 1 and res2.last_step == 2


def test_thinking_switch_reaches_the_chat_template():
    import copy

    from opdlens.opd.scoring import encode_user

    pol = copy.copy(tiny(0))
    pol.tokenizer = copy.deepcopy(pol.tokenizer)
    pol.tokenizer.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}"
    )
    plain, off, on = encode_user(pol, "hi"), encode_user(pol, "hi", False), encode_user(pol, "hi", True)
    assert plain == on and off != plain
    assert pol.decode(off).endswith(" /no_think")
