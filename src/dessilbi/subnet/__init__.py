"""Sparse subnetworks of a run: which filters to keep, and the network without the others.

- :func:`zero_pruned_filters`: zero pruned filters with their biases and the affine parameters
  of their normalisation channels (the "pruned network" of ``load_run(weights="pruned")``).
- :func:`filter_norms`: which norm layer normalises each layer's output channels.
"""

from dessilbi.subnet.dependency import filter_norms, zero_pruned_filters

__all__ = ["filter_norms", "zero_pruned_filters"]
