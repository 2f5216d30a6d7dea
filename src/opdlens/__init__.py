"""opdlens: per-token diagnostics and training for on-policy distillation of LLMs.

Start with ``opdlens demo`` (CLI) or :func:`opdlens.diagnose.run.diagnose` (Python); the map of
the package is docs/ARCHITECTURE.md.
"""

from opdlens.errors import OpdlensError
from opdlens.policy import Completion, Policy

__version__ = "0.1.0"
__all__ = ["Completion", "OpdlensError", "Policy", "__version__"]
