"""The recording of the DessiLBI path over a run (``path.pt``): the recorder and the reader.

:class:`PathRecorder` follows a model and its optimizer through training (entry steps after
every step, norms and supports at every epoch); :func:`load_path` reads what it saved. Names are
those of :mod:`dessilbi.path` (no DDP ``module.`` prefix).

The path file (:meth:`PathRecorder.state_dict`, format ``"dessilbi.path"`` version 2)
---------------------------------------------------------------------------------------
Top level: ``format``, ``version``, ``names`` (recorded layers, in the order first seen),
``structures``, ``epochs`` (int64 ``[E]``), ``steps`` (int64 ``[E]``: the last step seen when
each epoch was recorded), ``last_step`` (int). The other keys map a layer name to a tensor.
A layer's *group grid* is ``[G]`` under ``"filter"``/``"channel"`` and the weight's own shape
under ``"element"`` (one group per entry); per-group tensors are stored flat (row-major).

For every layer:

- ``entry_step``, ``entry_epoch``: int32, one per group of the current grid: the first step /
  epoch at which the group was nonzero, ``-1`` while it never was.
- ``group_shape``: int64 ``[E, d]``, the grid at each epoch; all zeros at an epoch where the
  layer was not coupled (not yet added, or gone).
- ``shape_changes`` int64 ``[K, d]`` and ``shape_changed_at`` int64 ``[K, 2]`` (step, epoch):
  the grid when the layer was first seen and after every widening (used by ``truncate``).
- ``selected`` int64 ``[E]``; ``weight_norm`` and ``sparse_weight_norm`` float32 ``[E]``:
  ‖W‖ and ‖W̃‖ of the whole tensor (NaN where the layer was not coupled).

Group-structured layers only (the version-1 keys, unchanged): ``group_norms`` float32
``[E, G]`` (‖W_g‖ per epoch) and ``support`` bool ``[E, G]``, ``G`` the current group count;
groups that did not exist yet at an epoch (a layer added or widened later) hold NaN / False.

Filter pictures (optional; files without them read as having none): ``picture_layer`` (str,
``""`` for none): the first filter-structured 4-D layer recorded, and ``filter_pictures``
{that layer: float16 ``[E, F, c, h, w]``}: its first ``F <= 64`` filters at every epoch, the 3
input channels kept for RGB inputs (``c = 3``), else their mean (``c = 1``); NaN where the layer
was not coupled or had fewer filters. About 19 kB an epoch for ResNet-18's 7x7 stem.

Element-structured layers only (no per-entry, per-epoch tensors: a 512x1000 classifier would
take 2.5 MB an epoch): ``support_flips`` int32, the flat indices whose support changed at each
epoch, concatenated, and ``support_flip_counts`` int64 ``[E]``, how many belong to each epoch.
The support at epoch e is that of e-1 (embedded in the grid of e when the layer was widened;
empty when it was not coupled) with those entries flipped. :class:`PathRecord` decodes it.
"""

from __future__ import annotations

import math
import operator
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.optim import Optimizer

from dessilbi.optim.proximal import FILTER_STRUCTURES, group_axis, group_norms
from dessilbi.path import coupled_parameters

__all__ = [
    "PATH_FORMAT",
    "PATH_VERSION",
    "PathFileError",
    "PathRecord",
    "PathRecorder",
    "filter_picture",
    "load_path",
]

#: The ``"format"`` tag of a path state dict / ``path.pt``.
PATH_FORMAT = "dessilbi.path"
#: The version :meth:`PathRecorder.state_dict` writes (1: the untagged dense format before it).
PATH_VERSION = 2

_ENTRY_DTYPE = torch.int32
#: At most this many filters of the picture layer are kept per epoch.
PICTURE_FILTERS = 64
#: Kernels larger than this (per side) are not pictured.
_PICTURE_MAX_KERNEL = 11


# --------------------------------------------------------------------------- recording internals

Shape = tuple[int, ...]


def _grid(structure: str, weight_shape: Sequence[int]) -> Shape:
    """The group grid of a weight: ``(G,)`` for group structures, the weight shape for elements."""
    if structure == "element":
        return tuple(int(n) for n in weight_shape)
    return (int(weight_shape[group_axis(structure)]),)


def _grid_support(gamma: torch.Tensor, structure: str) -> torch.Tensor:
    """Selected groups of Γ as a bool tensor of the group grid (on Γ's device, no sync)."""
    if structure == "element":
        return gamma != 0
    return group_norms(gamma, structure) > 0


def _embed(t: torch.Tensor, shape: Shape, fill: float | bool) -> torch.Tensor:
    """``t`` in the top-left corner of a ``shape`` tensor filled with ``fill``: old groups keep
    their multi-index when a grid widens (for elements: along any dimension)."""
    if tuple(t.shape) == shape:
        return t
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _corner(t: torch.Tensor, shape: Shape) -> torch.Tensor:
    """The inverse of :func:`_embed`: the top-left ``shape`` block of ``t`` (a copy)."""
    return t[tuple(slice(0, n) for n in shape)].clone()


def _picturable(structure: str, weight: torch.Tensor) -> bool:
    """Whether a coupled weight is a convolution whose filters can be shown as pictures."""
    return (structure in FILTER_STRUCTURES and weight.dim() == 4
            and max(weight.shape[2:]) <= _PICTURE_MAX_KERNEL)


def filter_picture(weight: torch.Tensor) -> torch.Tensor:
    """The first filters of a conv weight as small pictures: float16 ``[F, c, h, w]``, RGB
    (``c = 3``) for 3 input channels, else the mean over the input channels (``c = 1``)."""
    filters = weight.detach()[:PICTURE_FILTERS].float()
    if filters.shape[1] != 3:
        filters = filters.mean(1, keepdim=True)
    return filters.half().cpu()


@dataclass
class _Row:
    """One layer at one recorded epoch. ``present`` False: the layer was not coupled then."""

    shape: Shape
    present: bool
    selected: int
    weight_norm: float
    sparse_norm: float
    norms: torch.Tensor | None = None  # group layers: float32 [G_e]
    support: torch.Tensor | None = None  # group layers: bool [G_e]
    flips: torch.Tensor | None = None  # element layers: int32 flat indices
    picture: torch.Tensor | None = None  # the picture layer: float16 [F, c, h, w]


@dataclass
class _Layer:
    """Everything recorded about one coupled tensor (by name)."""

    name: str
    structure: str
    shape: Shape  # the current group grid
    entry_step: torch.Tensor  # int32, `shape`, kept on Γ's device
    entry_epoch: torch.Tensor  # int32, `shape`, CPU
    shape_log: list[tuple[int, int, Shape]]  # (step, epoch, grid) when first seen / widened
    rows: list[_Row] = field(default_factory=list)
    last_support: torch.Tensor | None = None  # element layers: the support of the last row

    @property
    def is_element(self) -> bool:
        return self.structure == "element"


def _new_layer(name: str, structure: str, shape: Shape, step: int, epoch: int, rows: int) -> _Layer:
    layer = _Layer(
        name,
        structure,
        shape,
        torch.full(shape, -1, dtype=_ENTRY_DTYPE),
        torch.full(shape, -1, dtype=_ENTRY_DTYPE),
        [(step, epoch, shape)],
    )
    # Epochs recorded before the layer was coupled get "not coupled" rows, so that row i of
    # every layer is epoch i of the recording.
    layer.rows = [_absent_row(len(shape)) for _ in range(rows)]
    return layer


def _absent_row(ndim: int) -> _Row:
    return _Row((0,) * ndim, False, 0, math.nan, math.nan)


def _replay(layer: _Layer) -> Iterator[torch.Tensor]:
    """The support of every recorded epoch of ``layer``, in its grid of that epoch (CPU bool)."""
    current: torch.Tensor | None = None
    for row in layer.rows:
        if not row.present:
            current = None
            yield torch.zeros(row.shape, dtype=torch.bool)
        elif row.support is not None:
            yield row.support
        else:
            assert row.flips is not None
            prev = torch.zeros(row.shape, dtype=torch.bool) if current is None else current
            flat = _embed(prev, row.shape, False).reshape(-1).clone()
            idx = row.flips.long()
            flat[idx] = ~flat[idx]
            current = flat.view(row.shape)
            yield current


def _last_support(layer: _Layer) -> torch.Tensor | None:
    """What ``record_epoch`` diffs the next element support against (None: empty)."""
    if not layer.is_element or not layer.rows or not layer.rows[-1].present:
        return None
    # Only the last support is wanted: a deque of one keeps memory at one grid.
    return deque(_replay(layer), maxlen=1)[0]


def _mismatch(layer: _Layer, structure: str, shape: Shape) -> str | None:
    """Why the live tensor cannot continue ``layer``'s record (None: it can)."""
    if structure != layer.structure:
        return (
            f"{layer.name}: recorded with structure {layer.structure!r}, now coupled as "
            f"{structure!r}; a path cannot change a layer's structure"
        )
    narrower = len(shape) != len(layer.shape) or any(
        n < o for n, o in zip(shape, layer.shape, strict=True)
    )
    if narrower:
        return (
            f"{layer.name}: its group grid went from {layer.shape} to {shape}; a recorded layer "
            "may only widen (new groups are appended). After pruning, which groups were kept "
            "is unknown here: save this path and start a new PathRecorder for the pruned network"
        )
    return None


# --------------------------------------------------------------------------------- the recorder


class PathRecorder:
    """Records the sparse-structure path of a run: when groups enter Γ's support, and per epoch
    the support of Γ and norms of W (see the module docstring for the stored format).

    Call :meth:`update_step` after every optimizer step (cheap: one reduction over each Γ on its
    device, no GPU sync) to keep the first *step* at which each group became nonzero, and
    :meth:`record_epoch` at the end of every epoch. Groups may leave the support again: the
    per-epoch supports show the current state, the entry step/epoch the first entry.

    The recorded tensors are looked up by name at every call, so the recording follows the
    optimizer: a param group added later is recorded from then on (its groups ``-1`` until they
    enter); a parameter replaced by a wider one keeps its groups' history and gets the new groups
    appended (``-1``; NaN norms / False support at earlier epochs); a layer that is no longer
    coupled keeps its history (and "not coupled" rows from then on). A layer whose grid shrinks
    or whose structure changes raises ``ValueError``: a path cannot tell which groups a pruning
    kept. The lookup is redone only when the optimizer's param groups change (checked by
    identity, a few microseconds a step); replace a parameter in the optimizer, not only in the
    model, for it to be noticed.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer) -> None:
        self._model = model
        self._optimizer = optimizer
        self._layers: dict[str, _Layer] = {}
        self._picture_layer: str | None = None
        self._epochs: list[int] = []
        self._steps: list[int] = []
        self._last_step = 0
        self._signature: list[tuple[Any, list[torch.Tensor]]] | None = None
        self._live: list[tuple[_Layer, torch.Tensor]] = []
        self._refresh(self._last_step, 0)

    @property
    def model(self) -> nn.Module:
        """The model the names come from; may be replaced (e.g. by a grown one)."""
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model = model
        self._signature = None  # re-read names and tensors at the next call

    @property
    def optimizer(self) -> Optimizer:
        """The optimizer Γ and the structures come from; may be replaced."""
        return self._optimizer

    @optimizer.setter
    def optimizer(self, optimizer: Optimizer) -> None:
        self._optimizer = optimizer
        self._signature = None

    @property
    def names(self) -> list[str]:
        """The recorded layers, in the order first seen (coupled now or not)."""
        return list(self._layers)

    @property
    def structures(self) -> list[str]:
        """The structure of each recorded layer, as :attr:`names`."""
        return [layer.structure for layer in self._layers.values()]

    @property
    def epochs(self) -> list[int]:
        """The recorded epochs, in order."""
        return list(self._epochs)

    # -- following the optimizer

    def _unchanged(self) -> bool:
        groups = self.optimizer.param_groups
        sig = self._signature
        return (
            sig is not None
            and len(sig) == len(groups)
            and all(
                structure == g.get("structure")
                and len(params) == len(g["params"])
                and all(map(operator.is_, params, g["params"]))
                for (structure, params), g in zip(sig, groups, strict=True)
            )
        )

    def _refresh(self, step: int, epoch: int) -> None:
        """Re-read the coupled tensors when the optimizer's params changed; all checks come
        before any change, so a refused layer leaves the recording as it was."""
        if self._unchanged():
            return
        found = coupled_parameters(self.model, self.optimizer)
        plan = []
        for name, param, structure in found:
            shape = _grid(structure, param.shape)
            layer = self._layers.get(name)
            if layer is not None and (problem := _mismatch(layer, structure, shape)):
                raise ValueError(problem)
            plan.append((name, param, structure, shape))
        live = []
        for name, param, structure, shape in plan:
            layer = self._layers.get(name)
            if layer is None:
                layer = _new_layer(name, structure, shape, step, epoch, len(self._epochs))
                self._layers[name] = layer
            elif shape != layer.shape:
                layer.entry_step = _embed(layer.entry_step, shape, -1)
                layer.entry_epoch = _embed(layer.entry_epoch, shape, -1)
                layer.shape = shape
                layer.shape_log.append((step, epoch, shape))
            live.append((layer, param))
        self._live = live
        # Copies of the lists: growing code may swap a tensor inside the same list object.
        self._signature = [
            (g.get("structure"), list(g["params"])) for g in self.optimizer.param_groups
        ]

    # -- recording

    def update_step(self, step: int) -> None:
        """Note ``step`` as the entry step of every group that is nonzero for the first time."""
        self._refresh(step, self._epochs[-1] if self._epochs else 0)
        state = self.optimizer.state
        for layer, param in self._live:
            gamma = state.get(param, {}).get("gamma")
            if gamma is None:
                continue
            # Kept on Γ's device: this runs every step and must not sync with a GPU.
            entry = layer.entry_step
            if entry.device != gamma.device:
                entry = layer.entry_step = entry.to(gamma.device)
            # masked_fill_, not boolean indexing: indexing with a mask syncs with a GPU.
            entry.masked_fill_(_grid_support(gamma, layer.structure) & entry.lt(0), step)
        self._last_step = step

    def record_epoch(self, epoch: int) -> None:
        """Record the support of Γ and the norms of W at the end of ``epoch``."""
        self._refresh(self._last_step, epoch)
        live = {layer.name: param for layer, param in self._live}
        for layer in self._layers.values():
            param = live.get(layer.name)
            if param is None:
                layer.rows.append(_absent_row(len(layer.shape)))
                layer.last_support = None
            else:
                layer.rows.append(self._row(layer, param, epoch))
                if self._picture_layer is None and _picturable(layer.structure, param):
                    self._picture_layer = layer.name
                if layer.name == self._picture_layer:
                    layer.rows[-1].picture = filter_picture(param)
        self._epochs.append(epoch)
        self._steps.append(self._last_step)

    @torch.no_grad()
    def _row(self, layer: _Layer, param: torch.Tensor, epoch: int) -> _Row:
        weight = param.detach()
        gamma = self.optimizer.state.get(param, {}).get("gamma")
        if gamma is None:
            support = torch.zeros(layer.shape, dtype=torch.bool)
            sparse_norm = 0.0
        else:
            support = _grid_support(gamma, layer.structure).cpu()
            sparse = torch.linalg.vector_norm(weight * (gamma != 0))
            sparse_norm = float(sparse.float())
        entered = layer.entry_step.cpu() >= 0
        layer.entry_epoch.masked_fill_((entered | support) & layer.entry_epoch.lt(0), epoch)
        row = _Row(
            layer.shape,
            True,
            int(support.sum()),
            float(torch.linalg.vector_norm(weight).float()),
            sparse_norm,
        )
        if layer.is_element:
            prev = layer.last_support
            before = torch.zeros_like(support) if prev is None else _embed(prev, layer.shape, False)
            row.flips = (support ^ before).reshape(-1).nonzero().reshape(-1).to(torch.int32)
            layer.last_support = support
        else:
            row.norms = group_norms(weight, layer.structure).float().cpu()
            row.support = support
        return row

    def truncate(self, epoch: int, step: int) -> None:
        """Forget everything recorded after ``epoch`` / ``step``: the recording becomes what it
        was right after ``record_epoch(epoch)`` was called at step ``step``.

        Epoch rows after ``epoch`` are dropped, entries with a later step or epoch become -1,
        layers first seen and widenings made after it are undone. For resuming from the
        checkpoint of epoch e, step s_e, with a path file written after it (one epoch ahead).

        Raises:
            ValueError: when a kept epoch was recorded after ``step`` (the recording is not of
                the run that reached ``step`` at ``epoch``).
        """
        keep = sum(1 for e in self._epochs if e <= epoch)
        recorded = zip(self._epochs[:keep], self._steps[:keep], strict=True)
        late = [(e, s) for e, s in recorded if s > step]
        if late:
            raise ValueError(
                f"cannot truncate the path to epoch {epoch}, step {step}: epoch {late[0][0]} was "
                f"recorded at step {late[0][1]}; the path is of another run or checkpoint"
            )
        layers = {}
        for name, layer in self._layers.items():
            log = [(s, e, g) for s, e, g in layer.shape_log if s <= step and e <= epoch]
            if not log:
                continue  # first seen after (epoch, step)
            shape = log[-1][2]
            entry_step = _corner(layer.entry_step.cpu(), shape)
            entry_epoch = _corner(layer.entry_epoch, shape)
            entry_step.masked_fill_(entry_step > step, -1)
            entry_epoch.masked_fill_(entry_epoch > epoch, -1)
            kept = _Layer(name, layer.structure, shape, entry_step, entry_epoch, log)
            kept.rows = layer.rows[:keep]
            kept.last_support = _last_support(kept)
            layers[name] = kept
        self._layers = layers
        if self._picture_layer not in layers:
            self._picture_layer = None
        self._epochs = self._epochs[:keep]
        self._steps = self._steps[:keep]
        self._last_step = step
        self._signature = None  # re-read the live tensors (a widening may have to be redone)
        self._live = []

    # -- saving and loading

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded so far, in the format of the module docstring (tensors, ints,
        strings and lists only: it loads with ``torch.load(..., weights_only=True)``)."""
        state: dict[str, Any] = {
            "format": PATH_FORMAT,
            "version": PATH_VERSION,
            "names": self.names,
            "structures": self.structures,
            "epochs": torch.tensor(self._epochs, dtype=torch.long),
            "steps": torch.tensor(self._steps, dtype=torch.long),
            "last_step": self._last_step,
            "picture_layer": self._picture_layer or "",
            "filter_pictures": {},
        }
        # Every per-layer key, in a fixed order, even where no layer has it.
        for key in _COMMON_KEYS + _GROUP_KEYS + _ELEMENT_KEYS:
            state[key] = {}
        for layer in self._layers.values():
            for key, value in _encode_layer(layer).items():
                state[key][layer.name] = value
        if self._picture_layer is not None:
            pictures = _encode_pictures(self._layers[self._picture_layer].rows)
            if pictures is not None:
                state["filter_pictures"][self._picture_layer] = pictures
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the recording with ``state`` (from :meth:`state_dict`; a version-1 state is
        upgraded, its element layers taking the live weight's shape).

        The live model is compared with the recording at the next :meth:`update_step` /
        :meth:`record_epoch`, not here, so that a path file written one epoch after the
        checkpoint being resumed (whose layers may have widened since) can be loaded, then
        :meth:`truncate`-d. There, coupled layers or groups the recording lacks are taken up
        like layers added or widened during the run; recorded layers the model no longer
        couples keep their history; a recorded layer coupled with another structure or a
        narrower grid raises ``ValueError`` naming it.

        Raises:
            ValueError: when ``state`` is no path state (the message says what is wrong);
                nothing is changed then.
        """
        shapes = {
            name: tuple(param.shape)
            for name, param, structure in coupled_parameters(self.model, self.optimizer)
            if structure == "element"
        }
        decoded = _decode_state(state, shapes)
        self._layers = decoded.layers
        self._picture_layer = decoded.picture_layer
        self._epochs = decoded.epochs
        self._steps = decoded.steps
        self._last_step = decoded.last_step
        self._signature = None
        self._live = []

    def record(self) -> PathRecord:
        """The recording so far as a :class:`PathRecord` (what ``load_path`` would give)."""
        return PathRecord(self.state_dict(), source="PathRecorder")


# ------------------------------------------------------------------------ encoding and decoding

_COMMON_KEYS = (
    "entry_step",
    "entry_epoch",
    "group_shape",
    "shape_changes",
    "shape_changed_at",
    "selected",
    "weight_norm",
    "sparse_weight_norm",
)
_GROUP_KEYS = ("group_norms", "support")
_ELEMENT_KEYS = ("support_flips", "support_flip_counts")


def _encode_layer(layer: _Layer) -> dict[str, torch.Tensor]:
    rows, ndim = layer.rows, len(layer.shape)
    out = {
        "entry_step": layer.entry_step.cpu().reshape(-1).clone(),
        "entry_epoch": layer.entry_epoch.reshape(-1).clone(),
        "group_shape": torch.tensor([r.shape for r in rows], dtype=torch.long).view(-1, ndim),
        "shape_changes": torch.tensor([g for _, _, g in layer.shape_log], dtype=torch.long),
        "shape_changed_at": torch.tensor([(s, e) for s, e, _ in layer.shape_log]).view(-1, 2),
        "selected": torch.tensor([r.selected for r in rows], dtype=torch.long),
        "weight_norm": torch.tensor([r.weight_norm for r in rows], dtype=torch.float32),
        "sparse_weight_norm": torch.tensor([r.sparse_norm for r in rows], dtype=torch.float32),
    }
    if layer.is_element:
        flips = [r.flips for r in rows if r.flips is not None]
        counts = [0 if r.flips is None else r.flips.numel() for r in rows]
        out["support_flips"] = torch.cat(flips) if flips else torch.zeros(0, dtype=torch.int32)
        out["support_flip_counts"] = torch.tensor(counts, dtype=torch.long)
    else:
        groups = layer.shape[0]
        norms = torch.full((len(rows), groups), math.nan, dtype=torch.float32)
        support = torch.zeros((len(rows), groups), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r.norms is not None and r.support is not None:
                norms[i, : r.norms.numel()] = r.norms
                support[i, : r.support.numel()] = r.support
        out["group_norms"], out["support"] = norms, support
    return out


def _encode_pictures(rows: Sequence[_Row]) -> torch.Tensor | None:
    """The pictures of every epoch as one float16 ``[E, F, c, h, w]`` tensor (NaN: none that
    epoch); rows whose pictures differ from the last one's in ``c, h, w`` are left out."""
    shown = [r.picture for r in rows if r.picture is not None]
    if not shown:
        return None
    tail = tuple(shown[-1].shape[1:])
    count = max(p.shape[0] for p in shown if tuple(p.shape[1:]) == tail)
    out = torch.full((len(rows), count, *tail), math.nan, dtype=torch.float16)
    for i, r in enumerate(rows):
        if r.picture is not None and tuple(r.picture.shape[1:]) == tail:
            out[i, : r.picture.shape[0]] = r.picture
    return out


def _decode_pictures(layer: _Layer, pictures: torch.Tensor) -> None:
    """Give each row of ``layer`` its picture from :func:`_encode_pictures`'s tensor."""
    if pictures.dim() != 5 or pictures.shape[0] != len(layer.rows):
        raise ValueError(f"'filter_pictures' is not [{len(layer.rows)}, F, c, h, w]")
    for row, picture in zip(layer.rows, pictures, strict=True):
        valid = ~torch.isnan(picture.float().reshape(picture.shape[0], -1)).any(1)
        row.picture = picture[valid].clone() if bool(valid.any()) else None


class _Decoded(NamedTuple):
    version: int
    layers: dict[str, _Layer]
    epochs: list[int]
    steps: list[int]
    last_step: int
    picture_layer: str | None = None


def _decode_state(state: Any, element_shapes: Mapping[str, Shape] | None = None) -> _Decoded:
    """Check and decode a path state dict of any known version (``ValueError`` saying what is
    wrong otherwise)."""
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a dict, got {type(state).__name__}")
    if "format" not in state and {"names", "epochs", "support", "group_norms"} <= set(state):
        try:
            return _decode_v1(state, element_shapes or {})
        except (KeyError, IndexError, RuntimeError, TypeError) as exc:
            raise ValueError(f"damaged version-1 path state: {exc!r}") from exc
    if state.get("format") != PATH_FORMAT:
        raise ValueError(f"no 'format': {PATH_FORMAT!r} tag (keys: {sorted(state)[:8]})")
    if state.get("version") != PATH_VERSION:
        raise ValueError(
            f"path format version {state.get('version')!r}; this dessilbi reads {PATH_VERSION}"
        )
    missing = [k for k in ("names", "structures", "epochs", "steps", "last_step", *_COMMON_KEYS)
               if k not in state]
    if missing:
        raise ValueError(f"missing keys {missing}")
    names, structures = list(state["names"]), list(state["structures"])
    if len(names) != len(structures):
        raise ValueError("'names' and 'structures' differ in length")
    epochs = [int(e) for e in state["epochs"]]
    steps = [int(s) for s in state["steps"]]
    if len(steps) != len(epochs):
        raise ValueError("'epochs' and 'steps' differ in length")
    layers = {}
    for name, structure in zip(names, structures, strict=True):
        try:
            layers[name] = _decode_layer(state, name, structure, len(epochs))
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"layer {name!r}: {exc!r}") from exc
    picture_layer = str(state.get("picture_layer") or "") or None
    if picture_layer is not None:
        if picture_layer not in layers:
            raise ValueError(f"'picture_layer' {picture_layer!r} is not a recorded layer")
        pictures = state.get("filter_pictures", {}).get(picture_layer)
        if pictures is not None:
            _decode_pictures(layers[picture_layer], pictures)
    return _Decoded(PATH_VERSION, layers, epochs, steps, int(state["last_step"]), picture_layer)


def _decode_layer(state: Mapping[str, Any], name: str, structure: str, num_epochs: int) -> _Layer:
    log_shapes = [tuple(int(n) for n in g) for g in state["shape_changes"][name]]
    log_at = state["shape_changed_at"][name].tolist()
    shape = log_shapes[-1]
    layer = _Layer(
        name,
        structure,
        shape,
        state["entry_step"][name].to(_ENTRY_DTYPE).reshape(shape).clone(),
        state["entry_epoch"][name].to(_ENTRY_DTYPE).reshape(shape).clone(),
        [(int(s), int(e), g) for (s, e), g in zip(log_at, log_shapes, strict=True)],
    )
    grids = state["group_shape"][name].tolist()
    selected = state["selected"][name].tolist()
    weight_norm = state["weight_norm"][name].tolist()
    sparse_norm = state["sparse_weight_norm"][name].tolist()
    if not len(grids) == len(selected) == len(weight_norm) == len(sparse_norm) == num_epochs:
        raise ValueError(f"per-epoch tensors do not all have {num_epochs} rows")
    if layer.is_element:
        counts = state["support_flip_counts"][name].tolist()
        chunks = state["support_flips"][name].to(torch.int32).split(counts)
        if len(chunks) != num_epochs:
            raise ValueError(f"'support_flip_counts' has {len(chunks)} rows, not {num_epochs}")
    else:
        norms, support = state["group_norms"][name], state["support"][name]
        if norms.shape != (num_epochs, shape[0]) or support.shape != norms.shape:
            raise ValueError(f"'group_norms'/'support' are not [{num_epochs}, {shape[0]}]")
    for i, grid in enumerate(grids):
        row = _Row(tuple(grid), any(grid), selected[i], weight_norm[i], sparse_norm[i])
        if len(grid) != len(shape) or any(g > n for g, n in zip(grid, shape, strict=True)):
            raise ValueError(f"epoch row {i}: grid {tuple(grid)} does not fit in {shape}")
        if layer.is_element:
            flips = row.flips = chunks[i].clone()
            if flips.numel() and (int(flips.min()) < 0 or int(flips.max()) >= math.prod(grid)):
                raise ValueError(f"epoch row {i}: support flips outside the grid {tuple(grid)}")
        elif row.present:
            row.norms = norms[i, : grid[0]].clone()
            row.support = support[i, : grid[0]].clone()
        layer.rows.append(row)
    layer.last_support = _last_support(layer)
    return layer


def _decode_v1(state: Mapping[str, Any], element_shapes: Mapping[str, Shape]) -> _Decoded:
    """The untagged dense format of before version 2: every layer's group norms and support
    each epoch, fixed layers. Element layers are re-encoded as flips, in the shape given for
    them (the live weight's on resume; flat otherwise); steps of epochs are unknown (-1)."""
    epochs = [int(e) for e in state["epochs"]]
    layers = {}
    last_step = 0
    for name, structure in zip(state["names"], state["structures"], strict=True):
        norms, support = state["group_norms"][name].float(), state["support"][name].bool()
        entry_step, entry_epoch = state["entry_step"][name], state["entry_epoch"][name]
        numel = entry_step.numel()
        shape: Shape = (numel,)
        if structure == "element" and math.prod(element_shapes.get(name, ())) == numel:
            shape = tuple(element_shapes[name])
        if support.shape != (len(epochs), numel) or norms.shape != support.shape:
            raise ValueError(f"layer {name!r}: 'group_norms'/'support' are not [E, {numel}]")
        last_step = max(last_step, int(entry_step.max()) if numel else 0)
        layer = _Layer(
            name, structure, shape,
            entry_step.to(_ENTRY_DTYPE).reshape(shape).clone(),
            entry_epoch.to(_ENTRY_DTYPE).reshape(shape).clone(),
            [(0, 0, shape)],
        )
        previous = torch.zeros(numel, dtype=torch.bool)
        for i in range(len(epochs)):
            # ‖W‖ and ‖W̃‖ follow from the group norms: ‖W‖² is the sum of the ‖W_g‖².
            squares = norms[i].double().square()
            norm = float(squares.sum().sqrt().float())
            sparse_norm = float(squares[support[i]].sum().sqrt().float())
            row = _Row(shape, True, int(support[i].sum()), norm, sparse_norm)
            if structure == "element":
                row.flips = (support[i] ^ previous).nonzero().reshape(-1).to(torch.int32)
                previous = support[i]
            else:
                row.norms, row.support = norms[i].clone(), support[i].clone()
            layer.rows.append(row)
        layer.last_support = _last_support(layer)
        layers[name] = layer
    steps = [-1] * len(epochs)
    return _Decoded(1, layers, epochs, steps, last_step)


# ---------------------------------------------------------------------------------- the reader


class PathFileError(ValueError):
    """A path file that is damaged or holds no recorded path; the message names the file."""


class PathRecord:
    """A recorded path, read back (from :func:`load_path`, a checkpoint's ``"path"`` entry or
    :meth:`PathRecorder.record`), with the supports of both encodings decoded.

    Per-group tensors are shaped as the layer's group grid: ``[G]`` for filter/channel layers,
    the weight's shape for element layers. ``epoch`` arguments are recorded epoch numbers.
    """

    def __init__(self, state: Mapping[str, Any], source: str = "path state") -> None:
        """Raises ``ValueError`` when ``state`` is no path state dict (the message says why)."""
        decoded = _decode_state(state)
        self.source = source
        self.version = decoded.version
        self.epochs: list[int] = decoded.epochs
        self.steps: list[int] = decoded.steps
        self._layers = decoded.layers
        #: The layer whose filters are pictured at every epoch (None: none recorded).
        self.picture_layer: str | None = decoded.picture_layer

    @property
    def names(self) -> list[str]:
        """The recorded layers, in the order first seen."""
        return list(self._layers)

    def _layer(self, name: str) -> _Layer:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"{self.source}: no layer {name!r} (recorded: {self.names})") from None

    def _index(self, epoch: int) -> int:
        try:
            return self.epochs.index(epoch)
        except ValueError:
            raise ValueError(
                f"{self.source}: epoch {epoch} was not recorded (recorded: {self.epochs})"
            ) from None

    def structure(self, name: str) -> str:
        """The structure of layer ``name``."""
        return self._layer(name).structure

    def group_shape(self, name: str, epoch: int | None = None) -> Shape:
        """The group grid of ``name`` at ``epoch`` (all zeros: not coupled then), or now."""
        layer = self._layer(name)
        return layer.shape if epoch is None else layer.rows[self._index(epoch)].shape

    def entry_epoch(self, name: str) -> torch.Tensor:
        """First epoch each group was selected (-1: never), int32 in the current grid."""
        return self._layer(name).entry_epoch.clone()

    def entry_step(self, name: str) -> torch.Tensor:
        """First step each group was selected (-1: never seen by ``update_step``)."""
        return self._layer(name).entry_step.clone()

    def selected(self, name: str) -> torch.Tensor:
        """Selected groups at every recorded epoch, int64 ``[E]``."""
        return torch.tensor([r.selected for r in self._layer(name).rows], dtype=torch.long)

    def weight_norms(self, name: str, sparse: bool = False) -> torch.Tensor:
        """‖W‖ (or ‖W̃‖ when ``sparse``) of the whole tensor at every epoch, float32 ``[E]``."""
        rows = self._layer(name).rows
        values = [r.sparse_norm if sparse else r.weight_norm for r in rows]
        return torch.tensor(values, dtype=torch.float32)

    def group_norms(self, name: str) -> torch.Tensor:
        """‖W_g‖ per epoch and group, float32 ``[E, G]`` (NaN: no such group then); only
        group-structured layers keep them."""
        layer = self._layer(name)
        if layer.is_element:
            raise ValueError(
                f"{self.source}: {name} has the element structure, whose per-entry norms are not "
                "stored; use weight_norms() for ‖W‖ and ‖W̃‖"
            )
        return _encode_layer(layer)["group_norms"]

    def support(self, name: str, epoch: int) -> torch.Tensor:
        """The selected groups of ``name`` at ``epoch``: dense bool in that epoch's grid."""
        index = self._index(epoch)
        for i, support in enumerate(_replay(self._layer(name))):
            if i == index:
                return support.clone()
        raise AssertionError("unreachable: every recorded epoch has a row")

    def filter_pictures(self) -> dict[int, torch.Tensor]:
        """The first filters of :attr:`picture_layer` per recorded epoch, float16
        ``[F, c, h, w]`` (see the module docstring); empty when none were recorded."""
        if self.picture_layer is None:
            return {}
        rows = self._layer(self.picture_layer).rows
        return {e: r.picture.clone() for e, r in zip(self.epochs, rows, strict=True)
                if r.picture is not None}

    def supports(self, name: str) -> list[torch.Tensor]:
        """The support at every recorded epoch (as :meth:`support`, decoded in one pass)."""
        return [s.clone() for s in _replay(self._layer(name))]


def load_path(file: str | os.PathLike[str]) -> PathRecord:
    """Read a ``path.pt`` (with ``weights_only=True``) written by :class:`PathRecorder`.

    Raises:
        FileNotFoundError: no file there.
        PathFileError: the file cannot be unpickled, or holds no path state (names the file).
    """
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no path file there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged zip or pickle raises all kinds of errors
        raise PathFileError(f"{path}: cannot be read as a path file ({exc})") from exc
    try:
        return PathRecord(state, source=str(path))
    except ValueError as exc:
        raise PathFileError(f"{path}: not a dessilbi path file: {exc}") from exc
