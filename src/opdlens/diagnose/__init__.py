"""The diagnostic: the generation tree, its per-node signals and the run that builds them.

The modules follow the README's numbered steps (docs/ARCHITECTURE.md draws the map): ``tree``,
``signals``, ``uncertainty``, ``targeting``, ``teachers``, ``schedule``, ``sampling``,
``phase1``, ``enrichment``, ``scoring``, ``diagnosis``, ``run``, ``distributed`` (Ray).
The names below are imported on first use, so ``import opdlens.diagnose.store`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "diagnose": "run",
    "build_diagnosis": "run",
    "load_results": "run",
    "Diagnosis": "diagnosis",
    "DiagnoseConfig": "config",
    "QuestionEnv": "questions",
    "Teacher": "schedule",
    "ModelSlot": "schedule",
    "Runtime": "state",
    "TeacherSpec": "teachers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'opdlens.diagnose' has no attribute {name!r}")
    return getattr(importlib.import_module(f"opdlens.diagnose.{_EXPORTS[name]}"), name)
