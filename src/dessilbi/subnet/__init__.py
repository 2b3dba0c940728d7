"""Sparse subnetworks of a run: which filters to keep, and the network without the others.

- :mod:`dessilbi.subnet.masks`: filter masks from the path (supp Γ, the paper's order with a
  keep ratio) and baselines of the same counts (L1 norm, random), saved as small JSON files.
- :func:`zero_pruned_filters`: zero pruned filters with their biases and the affine parameters
  of their normalisation channels (the "pruned network" of ``load_run(weights="pruned")``).
- :func:`filter_norms`: which norm layer normalises each layer's output channels.
- :func:`compact`: the network with the pruned filters removed physically, and its optimizer
  state sliced to match.

The dependency graph comes from torch-pruning (``pip install 'dessilbi[subnet]'``).
"""

from dessilbi.subnet.compact import CompactResult, compact
from dessilbi.subnet.dependency import filter_norms, zero_pruned_filters
from dessilbi.subnet.masks import (
    FilterMask,
    MaskFileError,
    l1_mask,
    load_mask,
    ordered_mask,
    path_order,
    random_mask,
    support_mask,
)

__all__ = [
    "CompactResult",
    "FilterMask",
    "MaskFileError",
    "compact",
    "filter_norms",
    "l1_mask",
    "load_mask",
    "ordered_mask",
    "path_order",
    "random_mask",
    "support_mask",
    "zero_pruned_filters",
]
