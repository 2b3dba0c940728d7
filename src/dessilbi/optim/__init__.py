"""The DessiLBI optimizer and the proximal maps of its sparsity penalties.

Modules, each importing only those before it: :mod:`~dessilbi.optim.proximal` (the proximal
maps and group geometry), :mod:`~dessilbi.optim.functional` (the eager per-tensor and foreach
steps), :mod:`~dessilbi.optim.fused` (the compiled step) and :mod:`~dessilbi.optim.optimizer`
(the :class:`DessiLBI` class and the functional dispatcher :func:`dessilbi`).
"""

from dessilbi.optim.optimizer import DessiLBI, NonFiniteGradientError, dessilbi
from dessilbi.optim.proximal import GROUP_SCALINGS, STRUCTURES, group_norms, prox

__all__ = [
    "GROUP_SCALINGS",
    "STRUCTURES",
    "DessiLBI",
    "NonFiniteGradientError",
    "dessilbi",
    "group_norms",
    "prox",
]
