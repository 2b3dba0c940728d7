"""dessilbi: structural sparsity of deep networks via inverse scale spaces (DessiLBI).

The public surface: the :class:`DessiLBI` optimizer, :func:`structured_param_groups` to build its
param groups from any model, read-outs of the sparse structure along the path (live, and from a
run's ``path.pt`` with :func:`load_path`), masks, and the hooks of the one training loop
(:class:`Callback`, :class:`FixedMask`; the loop itself is :func:`dessilbi.train.train`), and
subnetworks: filter masks (:mod:`dessilbi.subnet`) and :func:`compact`, the network with its
pruned filters removed (needs torch-pruning, ``pip install 'dessilbi[subnet]'``).
"""

from dessilbi.callbacks import Callback, FixedMask
from dessilbi.masks import apply_masks, masked_weights
from dessilbi.numerics import flush_denormal, set_flush_denormal
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
from dessilbi.path_record import PathRecord, PathRecorder, load_path
from dessilbi.run_state import Architecture, TrainingRun
from dessilbi.runs import LoadedRun, load_run
from dessilbi.structure import structured_param_groups
from dessilbi.subnet import CompactResult, FilterMask, compact, load_mask

__version__ = "0.1.0"

__all__ = [
    "STRUCTURES",
    "Architecture",
    "Callback",
    "CompactResult",
    "CoupledTensor",
    "DessiLBI",
    "FilterMask",
    "FixedMask",
    "LoadedRun",
    "NonFiniteGradientError",
    "PathRecord",
    "PathRecorder",
    "TrainingRun",
    "__version__",
    "apply_masks",
    "compact",
    "coupled_tensors",
    "flush_denormal",
    "group_norms",
    "group_support",
    "load_mask",
    "load_path",
    "load_run",
    "masked_weights",
    "prox",
    "selected_groups",
    "set_flush_denormal",
    "sparse_weights",
    "structured_param_groups",
    "support_masks",
    "weight_group_norms",
]
