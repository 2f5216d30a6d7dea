"""``python -m opdlens.opd CONFIG.yaml``: ``opdlens train`` for launchers that take a module
(``accelerate launch -m opdlens.opd CONFIG.yaml``, ``torchrun --nproc_per_node N -m opdlens.opd ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

from opdlens.opd.cli import train_cmd
from opdlens.errors import OpdlensError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m opdlens.opd CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        train_cmd(Path(args[0]))
    except OpdlensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
