"""The DessiLBI optimizer and the proximal maps of its sparsity penalties."""

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
