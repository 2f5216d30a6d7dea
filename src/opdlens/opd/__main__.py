"""``python -m opdlens.opd CONFIG.yaml``: ``opdlens train`` for launchers that take a module
(``accelerate launch -m opdlens.opd CONFIG.yaml``, ``torchrun --nproc_per_node N -m opdlens.opd ...``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import typer

from opdlens.entry import run_app
from opdlens.opd.cli import train_cmd
from opdlens.opd.run import TrainResult

app = typer.Typer(add_completion=False)


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML training config"),
    overrides: Optional[list[str]] = typer.Argument(
        None, metavar="KEY=VALUE", help="overrides of the config's keys (as `opdlens train`)"
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="move an existing run directory aside (<out_dir>.old-<time>) and start afresh"
    ),
) -> TrainResult:
    """On-policy distillation training (as ``opdlens train CONFIG.yaml [KEY=VALUE ...] [--fresh]``)."""
    return train_cmd(config, fresh=fresh, overrides=overrides or [])


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """Command-line entry point; returns the run's result (bad input exits with status 2)."""
    result: TrainResult = run_app(app, argv, "python -m opdlens.opd")
    return result


if __name__ == "__main__":
    main()
