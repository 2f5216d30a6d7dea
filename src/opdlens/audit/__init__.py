"""The loss audit (``opdlens audit``): any distillation or RL loss's per-node gradient, by autograd
through the loss's own code, against the ideal gradient of a finished diagnose run
(docs/AUDIT.md): :mod:`~opdlens.audit.losses` (the audited losses, user losses),
:mod:`~opdlens.audit.gradients` (per-node expected gradients and their alignment),
:mod:`~opdlens.audit.run` (a run's audit: node table, Table 1 per loss, figure, files)."""
