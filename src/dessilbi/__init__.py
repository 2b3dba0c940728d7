"""dessilbi: structural sparsity of deep networks via inverse scale spaces (DessiLBI).

The public surface: the :class:`DessiLBI` optimizer, :func:`structured_param_groups` to build its
param groups from any model, and read-outs of the sparse structure along the path.
"""

from dessilbi.optim import STRUCTURES, DessiLBI, NonFiniteGradientError, group_norms, prox
from dessilbi.path import (
    CoupledTensor,
    coupled_tensors,
    group_support,
    selected_groups,
    sparse_weights,
    support_masks,
    weight_group_norms,
)
from dessilbi.structure import structured_param_groups

__version__ = "0.1.0"

__all__ = [
    "STRUCTURES",
    "CoupledTensor",
    "DessiLBI",
    "NonFiniteGradientError",
    "__version__",
    "coupled_tensors",
    "group_norms",
    "group_support",
    "prox",
    "selected_groups",
    "sparse_weights",
    "structured_param_groups",
    "support_masks",
    "weight_group_norms",
]
