"""Fixed vs adaptive targeting on a real student, against a large-budget run as the reference.

    python bench/budget_real.py [--student smollm2] [--device cuda] [--questions 4]
        [--rollouts 256] [--visit-targets 33 100] [--reference 400] [--json out.json]

The real-model counterpart of ``bench/budget.py`` (no exact success probabilities here). One
:func:`opdlens.diagnose.run.build_diagnosis` of ``opdlens diagnose`` (task arith, two
self-distillation teachers, default targeting and signals otherwise) samples the initial
rollouts, representative paths and teacher contexts once; every variant starts from a copy of
that run store, so all of them enrich the same paths. Variants: the fixed mode at
``--reference`` visits per pair (the reference), then the fixed and adaptive modes at each of
``--visit-targets``, each scored with both alignment estimators (the targeted rollouts are
sampled once per variant, the node tables twice). Per variant and estimator it reports the
targeted rollouts used, and on the nodes valid in the variant and in the reference the RMSE of
``align_gkd`` against the reference's plug-in value and the share with the reference's sign.
The reference is itself an estimate: its own error (about ``√(100 / reference)`` of the fixed
mode's at 100 visits) is part of every RMSE.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from opdlens.diagnose.config import DiagnoseConfig
from opdlens.diagnose.diagnosis import Diagnosis
from opdlens.diagnose.run import build_diagnosis
from opdlens.diagnose.store import RunStore
from opdlens.report.run import load_results

TEACHERS = [dict(name="Self-1C", context="1c"), dict(name="Self-1C1W", context="1c1w")]
ESTIMATORS = ("plugin", "posterior_mean")
KEY = ["teacher", "question_id", "path_id", "node"]


def variant(dx: Diagnosis, envs, base: Path, root: Path, targeting: dict) -> dict[str, pd.DataFrame | float]:
    """Targeted rollouts of one targeting setting (from a copy of the base store), scored with
    each estimator; the node tables, the targeted rollouts used and the seconds taken."""
    shutil.copytree(base, root)
    out: dict[str, pd.DataFrame | float] = {}
    t0 = time.perf_counter()
    for est in ESTIMATORS:
        shutil.rmtree(root / "nodes", ignore_errors=True)  # re-score only; the targeted rollouts are kept
        opts = dx.config.model_copy(
            update={
                "targeting": dx.config.targeting.model_copy(update=targeting),
                "signals": dx.config.signals.model_copy(update={"alignment_estimator": est}),
                "schedule": "resident",
            }
        )
        store = RunStore(root)
        Diagnosis(store, dx.student, dx.teachers, opts, dx.runtime, progress=False).run(envs)
        nodes, questions, _ = load_results(store)
        out[est] = nodes
        out["rollouts"] = float(questions["n_targeted"].sum())
    out["seconds"] = time.perf_counter() - t0
    return out


def score(nodes: pd.DataFrame, ref: pd.DataFrame) -> dict[str, float]:
    ok = lambda d: d[d["valid"].astype(bool) & np.isfinite(d["align_gkd"])].set_index(KEY)["align_gkd"]  # noqa: E731
    est, truth = ok(nodes), ok(ref)
    common = est.index.intersection(truth.index)
    err = est[common] - truth[common]
    return {
        "nodes": len(common),
        "rmse": float(np.sqrt((err**2).mean())) if len(common) else float("nan"),
        "same_sign": float((np.sign(est[common]) == np.sign(truth[common])).mean()) if len(common) else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="smollm2")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--visit-targets", type=int, nargs="+", default=[33, 100])
    ap.add_argument("--reference", type=int, default=400)
    ap.add_argument("--targeting", default="{}", help="JSON of extra targeting settings (all variants)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DiagnoseConfig.model_validate(
            dict(
                student=args.student,
                device=args.device,
                task="arith",
                seed=0,
                teachers=TEACHERS,
                out_dir=f"{tmp}/base",
                n_questions=args.questions,
                rollouts_per_question=args.rollouts,
                max_new_tokens=args.max_new_tokens,
                fallback_reference_solution=True,
            )
        )  # every question gets both teachers
        t0 = time.perf_counter()
        dx, envs = build_diagnosis(cfg, progress=False)
        for env in envs:
            dx.prepare(env)  # initial rollouts, paths, contexts: shared by every variant
        print(f"models and initial rollouts: {time.perf_counter() - t0:.1f} s", flush=True)
        extra = json.loads(args.targeting)
        ref = variant(
            dx, envs, Path(f"{tmp}/base"), Path(f"{tmp}/ref"), dict(extra, mode="fixed", visit_target=args.reference)
        )
        print(
            f"reference (fixed, {args.reference} visits): {ref['rollouts']:.0f} targeted rollouts, {ref['seconds']:.1f} s",
            flush=True,
        )
        rows = []
        for vt in args.visit_targets:
            for mode in ("fixed", "adaptive"):
                v = variant(
                    dx, envs, Path(f"{tmp}/base"), Path(f"{tmp}/{mode}-{vt}"), dict(extra, mode=mode, visit_target=vt)
                )
                for est in ESTIMATORS:
                    rows.append(
                        dict(
                            mode=mode,
                            estimator=est,
                            visit_target=vt,
                            rollouts=v["rollouts"],
                            seconds=v["seconds"],
                            **score(v[est], ref["plugin"]),
                        )
                    )
                print(pd.DataFrame(rows[-2:]).round(3).to_string(index=False, header=len(rows) == 2), flush=True)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"\nreference: fixed mode at {args.reference} visits, plug-in, {ref['rollouts']:.0f} targeted rollouts")
    print(table.round(3).to_string(index=False))
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(args=vars(args), reference_rollouts=ref["rollouts"], rows=rows), indent=1)
        )


if __name__ == "__main__":
    main()
