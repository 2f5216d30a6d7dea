"""Behaviour check of a refactor: run the demo's configuration at a seed and print a hash of every
column of every Parquet table in the run directory; ``--compare A.json B.json`` lists the columns
that differ (or exist on one side only).

    PYTHONPATH=<old checkout>/src python bench/demo_identity.py runs/old-s1 --seed 1 > old.json
    PYTHONPATH=src python bench/demo_identity.py runs/new-s1 --seed 1 > new.json
    python bench/demo_identity.py --compare old.json new.json

A run directory that exists is resumed (a resumed run gives the uninterrupted run's tables).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def column_hashes(root: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    out = {}
    for f in sorted(root.rglob("*.parquet")):
        table = pq.read_table(f)
        for name in sorted(table.column_names):
            digest = hashlib.sha256(str(table.column(name).to_pylist()).encode()).hexdigest()[:16]
            out[f"{f.relative_to(root)}:{name}"] = digest
    return out


def run_demo(out: Path, seed: int, questions: int) -> None:
    try:
        from opdlens.diagnose.config import demo_config
        from opdlens.diagnose.run import diagnose
    except ImportError:  # a checkout from before the diagnose/ package
        from opdlens.config import demo_config  # type: ignore[no-redef]
        from opdlens.pipeline import diagnose  # type: ignore[no-redef]
    diagnose(demo_config(str(out), questions).model_copy(update={"seed": seed}), progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", type=Path, help="run directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="two JSON outputs to compare")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        print(
            json.dumps(
                {
                    "common": len(set(a) & set(b)),
                    "differ": differ,
                    "only_a": sorted(set(a) - set(b)),
                    "only_b": sorted(set(b) - set(a)),
                },
                indent=1,
            )
        )
        return
    if args.out is None:
        sys.exit("give a run directory, or --compare A.json B.json")
    run_demo(args.out, args.seed, args.questions)
    print(json.dumps(column_hashes(args.out), indent=0, sort_keys=True))


if __name__ == "__main__":
    main()
