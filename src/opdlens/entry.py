"""The ``python -m`` entry points (``opdlens.opd``, ``opdlens.opd.demo``,
``opdlens.diagnose.calibrate``): each is a one-command typer app run through :func:`run_app`.

Why not ``app()`` as in the ``opdlens`` console script: typer's standalone mode always ends in
``sys.exit``, so a caller (the tests, a notebook) could not get what the command computed.
:func:`run_app` returns it and leaves everything else to typer as the console script does: the
same parsing, ``--help`` and usage errors (exit status 2), and an :class:`OpdlensError` printed
as ``error: ...`` with exit status 2, as :mod:`opdlens.cli` prints it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from opdlens.display import display_text
from opdlens.errors import OpdlensError

#: Exit status of bad input: usage errors (typer's own) and :class:`OpdlensError`.
EXIT_BAD_INPUT = 2


def run_app(app: typer.Typer, argv: Sequence[str] | None, prog_name: str) -> Any:
    """Run the one command of ``app`` on ``argv`` (default: ``sys.argv[1:]``) and return its result.

    Success returns the command's return value instead of exiting; ``--help``, usage errors and
    :class:`OpdlensError` exit (``SystemExit``) with typer's messages and statuses."""
    command = typer.main.get_command(app)
    run = command.callback
    assert run is not None  # a typer command always has its function as callback
    result: list[Any] = []

    def keep(**params: Any) -> None:
        try:
            result.append(run(**params))
        except OpdlensError as exc:
            Console(stderr=True, soft_wrap=True).print(
                f"[bold red]error:[/] {escape(display_text(exc, newlines=True))}"
            )
            raise typer.Exit(EXIT_BAD_INPUT) from None

    command.callback = keep
    try:
        command.main(args=None if argv is None else list(argv), prog_name=prog_name)
    except SystemExit as exc:  # standalone mode exits even on success (status 0)
        if exc.code in (0, None) and result:
            return result[0]
        raise
    raise AssertionError("typer's standalone mode returned without exiting")  # pragma: no cover


def choice(*names: str) -> Callable[[str], str]:
    """An option callback accepting only ``names``: a usage error that lists them otherwise (what
    argparse's ``choices`` gave, for options whose valid names come from a registry)."""

    def check(value: str) -> str:
        if value not in names:
            raise typer.BadParameter(f"{value!r} is not one of: {', '.join(names)}")
        return value

    return check
