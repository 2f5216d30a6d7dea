"""opdlens: per-token diagnostics and training for on-policy distillation of LLMs.

Start with ``opdlens demo`` (CLI) or :func:`opdlens.diagnose.run.diagnose` (Python); the map of
the package is docs/ARCHITECTURE.md.

The code cites two papers by letter and section:

* paper A: "Unmasking On-Policy Distillation: Where It Helps, Where It Hurts, and Why"
  (arXiv 2605.10889, 2026), the training-free diagnostics (:mod:`opdlens.diagnose`);
  docs/PROTOCOL.md lists the choices it leaves open;
* paper B: "Rethinking On-Policy Distillation of Large Language Models: Phenomenology,
  Mechanism, and Recipe" (2026), the OPD mechanism and recipe (:mod:`opdlens.opd`);
  docs/OPD.md compares its defaults with ours.
"""

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, Policy

__version__ = "0.1.0"
__all__ = ["Completion", "OpdlensError", "Policy", "__version__"]
