"""What one ``protocol: paper`` question costs, and what the paper's suite would cost on one GPU.

Runs :func:`opdlens.diagnose.run.diagnose` on ONE question with ``protocol: paper`` for each
student shape (``--shapes``: random weights of the Qwen3-0.6B and 1.7B shapes, bf16 on CUDA) and
each trace length (``--traces``: BoolQ-like 200 and MMLU-like 2,048 new tokens; random weights
rarely emit EOS, so the traces run to the budget), and reports per run:

* whole-run wall time and GPU-minutes (wall × GPUs);
* initial and targeted rollouts, generated tokens, GPU busy fraction (NVML);
* where the time goes: model loading, initial rollouts, solutions + summaries, teacher scoring
  (the targeting priorities' and the node tables' forward passes), targeted rollouts, other
  (each instant of the run counted once, in that order of precedence), and the exclusive time
  per kind of work of ``bench/diagnose.py`` (engine, forward passes, grading, I/O, ...);
* the projection of the paper's suite (students × tasks × questions × per-question cost) on one
  GPU of this kind, against the paper's 72 A100-days.

Grades: random weights never answer right, so a rollout's grade is a coin (the parity of a hash
of its tokens, ``bench/diagnose.py``'s coin grades) and the targeting thresholds ``tau_gkd`` and
``tau_gap`` are 0 (near-uniform distributions have tiny gradients; with the paper's thresholds
targeting would find nothing to do). The 1C(32B) solution writer's answers are graded by a coin
too (a CRC of the text), so that context is built and scored as in the paper.

Teachers (``--teachers``): ``paper`` (default) = the paper's 8 configurations: the 4 self-distillation
contexts, Self-1C(32B) (solution written by a random Qwen3-32B shape, which also writes the
Sum-* summaries), and external random Qwen3-4B / 8B / 14B shapes; ``self`` = the 4
self-distillation contexts only (the student summarises).

The targeted budget is the ``protocol: paper`` preset's (whatever ``PAPER_PRESET`` says at this
commit), unless ``--max-targeted N`` caps it (``targeting.max_rollouts_per_path`` = N / paths).
The projection scales the targeted time linearly in rollouts to the paper's stated 45K and 200K
targeted rollouts per question (§2.5, §3), besides the budget as run.

``--smoke``: a 2-layer random model for every model, traces of 12 / 24 tokens, 16 initial
rollouts, 1 + 1 targets per window of 8, 12, ... tokens, 6 visits per target: the whole path on a
CPU in seconds.

Usage: ``PYTHONPATH=src:. python bench/paper_question.py [--shapes qwen3-0.6b] [--traces boolq=200]
[--max-targeted 20000] [--json out.json] [--progress]``. A device call has at most 10 minutes: run one setting
per call (an MMLU-like question at the uncapped preset budget generates ~40M tokens; cap it with
``--max-targeted``), then ``--from-json a.json b.json ...`` prints the projection of them all.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `python bench/paper_question.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import diagnose as bd  # noqa: E402 - the timing helpers and coin grades of the whole-run bench
from opdlens import models  # noqa: E402
from opdlens.diagnose import diagnosis as dmod  # noqa: E402
from opdlens.diagnose import run as drun  # noqa: E402
from opdlens.diagnose.config import PAPER_PRESET, DiagnoseConfig  # noqa: E402
from opdlens.diagnose.store import RunStore  # noqa: E402
from opdlens.tasks.arith import ArithTask  # noqa: E402

#: Paper A's suite (PAPERS.md): 2 students × 3 tasks, 8 teacher configurations. Questions per task
#: are not stated by the paper; these are ours (configs/paper-*.yaml), AIME 2025 has 30 problems.
PAPER_A100_DAYS = 72.0
PAPER_TARGETED = (45_000, 200_000)  # targeted rollouts per question, "depending on trace length"
SUITE_STUDENTS = ("qwen3-0.6b", "qwen3-1.7b")
SUITE_QUESTIONS = {"boolq": 100, "mmlu": 100, "aime": 30}
AIME_TOKENS = 28_672  # configs/paper-aime-*.yaml's max_new_tokens (ours; AIME traces run 5K-30K tokens)

# ---------------------------------------------------------------------------- phase spans
#: Wall-clock spans of each phase (all threads), for a split that counts every instant once.
SPANS: dict[str, list[tuple[float, float]]] = defaultdict(list)
#: Precedence of the split: an instant inside several spans goes to the first label listed.
SPLIT = ("model loading", "teacher scoring", "solutions + summaries", "initial rollouts", "targeted rollouts")


def spanned(obj: Any, name: str, label: str) -> None:
    """Record the wall-clock span of every call of ``obj.name`` under ``label``."""
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def inner(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            SPANS[label].append((t0, time.perf_counter()))

    setattr(obj, name, inner)


def split_time(spans: dict[str, list[tuple[float, float]]], start: float, end: float) -> dict[str, float]:
    """Seconds of ``[start, end]`` per label of :data:`SPLIT` (an instant in several labels' spans
    goes to the first of them), the rest as ``other``."""
    cuts = sorted({start, end, *(t for ss in spans.values() for s in ss for t in s if start <= t <= end)})
    out = dict.fromkeys((*SPLIT, "other"), 0.0)
    for a, b in zip(cuts, cuts[1:]):
        mid = (a + b) / 2
        label = next((lab for lab in SPLIT if any(s <= mid < e for s, e in spans.get(lab, ()))), "other")
        out[label] += b - a
    return out


def instrument() -> None:
    """``bench/diagnose.py``'s instrumentation (exclusive time per kind of work, coin grades) and
    the phase spans of this bench."""
    bd.instrument()
    bd.COIN_GRADES = True
    D = dmod.Diagnosis
    for name, label in (
        ("initial_many", "initial rollouts"),
        ("solutions", "solutions + summaries"),
        ("external", "solutions + summaries"),
        ("write_priorities", "teacher scoring"),
        ("score_group", "teacher scoring"),
        ("enrich", "targeted rollouts"),
    ):
        spanned(D, name, label)
    spanned(models, "load_policy", "model loading")
    # the solution writer checks its samples with the task: a coin on the text (random weights)
    ArithTask.check = lambda self, text, q: zlib.crc32(text.encode()) % 2 == 0  # type: ignore[method-assign]


def smoke_loader() -> None:
    """``random:tiny`` (the student, built once) and ``random:tiny-<k>`` (other models, built
    afresh on every load, as the schedule frees them): 2-layer random models with SmolLM2's
    tokenizer."""
    orig = models.load_policy
    student: dict[str, Any] = {}

    def load(spec: str, **kw: Any) -> Any:
        if spec == "random:tiny":
            if spec not in student:
                student[spec] = models.tiny_random_policy(seed=0, init_std=0.02, device=kw.get("device", "cpu"))
            return student[spec]
        if spec.startswith("random:tiny-"):
            seed = int(spec.rsplit("-", 1)[1])
            return models.tiny_random_policy(seed=seed, init_std=0.02, device=kw.get("device", "cpu"))
        return orig(spec, **kw)

    models.load_policy = load


# ---------------------------------------------------------------------------- one question
def teachers_for(kind: str, smoke: bool) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The teacher list and the extra config keys (summariser, solution writer)."""
    teachers = list(bd.TEACHERS)
    if kind == "self":
        return teachers, {}
    big = (lambda i: f"random:tiny-{i}") if smoke else (lambda i: f"random:qwen3-{i}b")
    teachers += [
        dict(name="Self-1C(32B)", context="1c-ext"),
        dict(name="Qwen3-4B", model=big(4)),
        dict(name="Qwen3-8B", model=big(8)),
        dict(name="Qwen3-14B", model=big(14)),
    ]
    return teachers, dict(summarizer=big(32), solution_model=big(32))


def config_for(shape: str, tokens: int, out: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``protocol: paper`` config of one question (what the preset does not say is ours)."""
    teachers, extra = teachers_for(args.teachers, args.smoke)
    targeting: dict[str, Any] = dict(tau_gkd=0.0, tau_gap=0.0)  # coin grades on near-uniform models
    if args.max_targeted:
        paths = PAPER_PRESET["n_correct_paths"] + PAPER_PRESET["n_incorrect_paths"]
        targeting["max_rollouts_per_path"] = max(1, math.ceil(args.max_targeted / paths))
    cfg: dict[str, Any] = dict(
        protocol="paper",
        student=f"random:{shape}",
        device=args.device,
        dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        task="arith",
        n_questions=1,
        seed=0,
        rollouts_per_question=args.rollouts,
        max_new_tokens=tokens,
        teachers=teachers,
        targeting=targeting,
        out_dir=out,
        **extra,
    )
    if args.smoke:  # tiny budgets: the whole path in seconds on a CPU
        cfg["targeting"] = dict(targeting, first_window=8, per_window_gkd=1, per_window_gap=1, visit_target=6)
        cfg["signals"] = dict(min_visits=3)
        cfg.update(summary_max_new_tokens=16, solution_tries=4)
    if args.engine:
        cfg["engine"] = json.loads(args.engine)
    return cfg


def run_question(shape: str, task: str, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    """One question end to end: wall time, rollouts, the time split."""
    bd.reset()
    SPANS.clear()
    with tempfile.TemporaryDirectory() as tmp:
        raw = config_for(shape, tokens, str(Path(tmp) / "run"), args)
        cfg = DiagnoseConfig.model_validate(raw)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with bd.GpuBusy() as busy:
            t0 = time.perf_counter()
            drun.diagnose(cfg, progress=args.progress)
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
        store = RunStore(cfg.out_dir)
        qid = str(store.read_table("questions.parquet")["question_id"].iloc[0])
        initial, targeted = store.count_rollouts(qid, "initial"), store.count_rollouts(qid, "targeted")
        skips = store.read_table("skips.parquet")
        nodes = store.read_all("nodes")
        if args.keep:  # the run directory, e.g. to check the counts or replay it
            shutil.copytree(cfg.out_dir, Path(args.keep) / f"{shape}-{task}", dirs_exist_ok=True)
    wall = t1 - t0
    split = split_time(SPANS, t0, t1)
    work = dict(bd.EXCL)
    work["other (Python between calls)"] = wall - sum(bd.EXCL.values())
    return dict(
        shape=shape,
        task_like=task,
        max_new_tokens=tokens,
        teachers=[t["name"] for t in raw["teachers"]],
        device=torch.cuda.get_device_name() if cuda else "cpu",
        wall_s=wall,
        gpu_minutes=wall / 60 if cuda else None,  # one GPU
        gpu_busy=busy.fraction,
        peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        initial_rollouts=initial,
        targeted_rollouts=targeted,
        generated_tokens=sum(c["tokens"] for c in bd.CALLS),
        engine_calls=len(bd.CALLS),
        node_rows=len(nodes),
        skips=[f"{r.teacher or '(question)'}: {r.action} ({r.reason})" for r in skips.itertuples()],
        time_split_s=split,
        work_exclusive_s=work,
        config={k: raw[k] for k in ("rollouts_per_question", "max_new_tokens", "targeting") if k in raw}
        | {"signals": raw.get("signals", PAPER_PRESET["signals"])},
    )


# ---------------------------------------------------------------------------- projection
def per_question_s(r: dict[str, Any], n_targeted: float, questions: int) -> float:
    """One question's seconds with ``n_targeted`` targeted rollouts in a run of ``questions``
    questions: model loading shared by the setting's questions, the targeted time linear in rollouts."""
    s = r["time_split_s"]
    per_rollout = s["targeted rollouts"] / max(1, r["targeted_rollouts"])
    rest = r["wall_s"] - s["model loading"] - s["targeted rollouts"]
    return s["model loading"] / questions + rest + per_rollout * n_targeted


def projection(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The paper's suite on one GPU of this kind, from the measured questions."""
    by = {(r["shape"], r["task_like"]): r for r in results}
    budgets = {"as run": None, "45K targeted": PAPER_TARGETED[0], "200K targeted": PAPER_TARGETED[1]}
    rows, totals = [], dict.fromkeys(budgets, 0.0)
    totals_aime = dict.fromkeys(budgets, 0.0)
    for student in args.suite_students:
        for task, n_q in SUITE_QUESTIONS.items():
            src = by.get((student, task))
            scale, note = 1.0, "measured"
            if src is None and task == "aime" and (student, "mmlu") in by:
                src, scale = by[(student, "mmlu")], AIME_TOKENS / by[(student, "mmlu")]["max_new_tokens"]
                note = f"extrapolated: the MMLU-like question × {scale:.1f} (trace length, linear; assumption)"
            if src is None:
                rows.append(dict(student=student, task=task, questions=n_q, note="not measured"))
                continue
            row: dict[str, Any] = dict(student=student, task=task, questions=n_q, note=note)
            for label, n in budgets.items():
                sec = per_question_s(src, src["targeted_rollouts"] if n is None else n, n_q) * scale
                row[f"per_question_s ({label})"] = sec
                row[f"gpu_days ({label})"] = sec * n_q / 86400
                (totals_aime if task == "aime" else totals)[label] += sec * n_q / 86400
            rows.append(row)
    out: dict[str, Any] = dict(
        gpu=results[0]["device"] if results else "?",
        paper_a100_days=PAPER_A100_DAYS,
        settings=rows,
        suite_gpu_days_boolq_mmlu=totals,
        suite_gpu_days_with_aime=(
            {k: totals[k] + totals_aime[k] for k in totals} if any(totals_aime.values()) else None
        ),
    )
    out["not_measured"] = [f"{r['student']} {r['task']}" for r in rows if r["note"] == "not measured"]
    out["ratio_to_paper"] = {k: v / PAPER_A100_DAYS for k, v in (out["suite_gpu_days_with_aime"] or totals).items()}
    out["assumptions"] = [
        "suite = 2 students (Qwen3-0.6B, 1.7B) x 3 tasks (BoolQ, MMLU, AIME 2025) x 8 teacher configurations (paper)",
        f"questions per setting: {SUITE_QUESTIONS} (ours, paper silent; AIME 2025 has 30 problems)",
        "one question measured alone; a setting's run costs its questions' sum (no gain from batching questions "
        "together), model loading counted once per setting",
        "targeted time linear in the number of targeted rollouts (same depth mix as run); the paper's 45K-200K per "
        "question bound it, 'as run' is the protocol: paper preset of this commit (capped by --max-targeted if set)",
        "a --max-targeted cap keeps the shallow windows' targets (fixed mode, window order), whose rollouts are the "
        "longest: the per-rollout cost of a capped run is then an upper bound",
        "model loading: random weights built on the device (reading checkpoints takes longer), once per setting",
        f"AIME not measured: the MMLU-like question scaled by {AIME_TOKENS} / its trace length (linear in tokens; "
        "attention makes it super-linear)",
        "random weights: traces run to max_new_tokens, grades are coins, tau_gkd = tau_gap = 0 (ours)",
        "GPU-days of this GPU against A100-days: no A100/H100 speed factor applied",
        f"traces (new tokens) {args.trace_tokens}: ours (paper: BoolQ short, MMLU medium, AIME 5K-30K tokens; "
        "45K-200K targeted rollouts 'depending on trace length')",
    ]
    return out


# ---------------------------------------------------------------------------- CLI
def parse_traces(text: str) -> dict[str, int]:
    """``"boolq=200,mmlu=2048"`` -> ``{"boolq": 200, "mmlu": 2048}``."""
    out = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if not n.strip().isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"expected task=tokens, got {part!r}")
        out[name.strip()] = int(n)
    return out


def report(r: dict[str, Any]) -> None:
    busy = "n/a" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
    gpu_min = "n/a" if r["gpu_minutes"] is None else f"{r['gpu_minutes']:.2f}"
    print(
        f"\n== {r['shape']} {r['task_like']}-like ({r['max_new_tokens']} tokens), {len(r['teachers'])} teachers on "
        f"{r['device']}: wall {r['wall_s']:.1f} s = {gpu_min} GPU-min, GPU busy {busy}; "
        f"{r['initial_rollouts']} initial + {r['targeted_rollouts']:,} targeted rollouts, "
        f"{r['generated_tokens']:,} tokens, {r['node_rows']} node rows",
        flush=True,
    )
    for k, v in r["time_split_s"].items():
        print(f"   {k:<24} {v:9.2f} s  {100 * v / r['wall_s']:5.1f}%")
    for s in r["skips"]:
        print(f"   skip: {s}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-0.6b,qwen3-1.7b", help="student shapes (random weights)")
    ap.add_argument("--traces", type=parse_traces, default="boolq=200,mmlu=2048", help="task-like=max_new_tokens")
    ap.add_argument("--teachers", choices=("paper", "self"), default="paper")
    ap.add_argument("--rollouts", type=int, default=256, help="initial rollouts (ours, paper silent)")
    ap.add_argument("--max-targeted", type=int, default=0, help="cap of targeted rollouts per question (0: none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engine", default=None, help="JSON of the config's engine: block")
    ap.add_argument("--smoke", action="store_true", help="tiny models and budgets (CPU, seconds)")
    ap.add_argument(
        "--progress",
        action="store_true",
        help="progress bars per step (a device call cut at its limit shows how far it got)",
    )
    ap.add_argument("--json", default=None, help="write the results and the projection here")
    ap.add_argument("--keep", default=None, help="copy each run directory to KEEP/<shape>-<task>")
    ap.add_argument(
        "--from-json", nargs="+", default=None, help="run nothing: the projection of the results in these --json files"
    )
    args = ap.parse_args(argv)
    if isinstance(args.traces, str):
        args.traces = parse_traces(args.traces)
    if args.smoke:
        args.shapes, args.traces, args.rollouts = "tiny", {"boolq": 12, "mmlu": 24}, 16
        smoke_loader()
    args.trace_tokens = dict(args.traces)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.suite_students = shapes if args.smoke else list(SUITE_STUDENTS)
    results = []
    if args.from_json:  # e.g. one device call per setting, the projection of them all
        results = [r for f in args.from_json for r in json.loads(Path(f).read_text())["results"]]
        args.trace_tokens = {r["task_like"]: r["max_new_tokens"] for r in results}
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        instrument()
        for shape in shapes:
            for task, tokens in args.traces.items():
                r = run_question(shape, task, tokens, args)
                report(r)
                results.append(r)
    proj = projection(results, args)
    print(f"\nprojection of the paper's suite on one {proj['gpu']} (paper: {PAPER_A100_DAYS:g} A100-days):")
    for label, days in (proj["suite_gpu_days_with_aime"] or proj["suite_gpu_days_boolq_mmlu"]).items():
        print(f"   {label:<14} {days:10.2f} GPU-days  ({proj['ratio_to_paper'][label]:.3g} x the paper)")
    if proj["not_measured"]:
        print(f"   (incomplete: not measured and left out of the totals: {', '.join(proj['not_measured'])})")
    print("assumptions:\n   " + "\n   ".join(proj["assumptions"]))
    out = dict(results=results, projection=proj, argv=sys.argv[1:] if argv is None else argv)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
