"""Choosing λ per layer from the epoch at which selection is to start (``selection_start``).

While no group of a layer is selected, Γ = 0 and DessiLBI's V grows by ``(lr/ν)·W_g`` per step,
whatever λ is: ``‖V_g(t)‖ = ‖Σ_s (lr_s/ν) W_g(s)‖``, and group ``g`` enters when that exceeds
λ_g. Instead of a raw λ the user states the epoch ``E`` (counted from 1) during which every
coupled layer's first groups are to enter. The run is calibrated over its first ``c`` epochs
(``selection_calibration``) with λ = :data:`CALIBRATING_LAM` (nothing can enter); then each
group's growth of ‖V_g‖ over the last calibration epoch is extrapolated linearly, and each layer
gets the λ at which its fastest group would cross in the middle of epoch ``E``:

    λ_l = max_g ( ‖V_g(c)‖ + (E − ½ − c) · (‖V_g(c)‖ − ‖V_g(c − 1)‖) ),

‖V_g(e)‖ taken at the end of epoch ``e`` (``V(0) = 0``). Groups whose W the loss keeps at its
size enter near ``E``; groups that the coupling's pull shrinks (by ``κ·lr/ν`` per step) enter
later or never: the order after the start is the data's.

λ_l is never below the largest ‖V_g‖ seen in any step of the calibration, so no group would
have entered during it under λ_l: the run is exactly DessiLBI with these per-layer λ from step 0
(a test checks this bitwise). Only hyperparameters are chosen, one per param group (a coupled
layer each), and they are kept in the optimizer's param groups (so in every checkpoint), in this
callback's state and in ``metrics.jsonl`` (``selection_lam`` at the calibration epoch).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dessilbi.callbacks import Callback
from dessilbi.optim.proximal import group_norms

if TYPE_CHECKING:
    from dessilbi.run_state import TrainingRun

__all__ = ["CALIBRATING_LAM", "StartEpochThresholds", "pull_rate", "settling_steps",
           "split_coupled_groups", "start_thresholds"]

#: λ of every coupled layer during the calibration: larger than any ‖V_g‖ can get.
CALIBRATING_LAM = 1e30


def split_coupled_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One param group per coupled tensor (so each gets its own λ; a ``"tied"`` group stays
    one group, its filters being one group across its tensors), uncoupled groups as given;
    λ set to :data:`CALIBRATING_LAM` and the group scaling to ``"none"`` (λ_l is compared with
    ‖V_g‖ directly)."""
    out = []
    for group in groups:
        if group.get("structure") is None:
            out.append(group)
            continue
        if group["structure"] == "tied":
            out.append({**group, "lam": CALIBRATING_LAM, "group_scaling": "none"})
            continue
        names = group.get("param_names", [None] * len(group["params"]))
        for param, name in zip(group["params"], names, strict=True):
            single = {**group, "params": [param], "lam": CALIBRATING_LAM, "group_scaling": "none"}
            if name is not None:
                single["param_names"] = [name]
            out.append(single)
    return out


def _v_norms(v: torch.Tensor, structure: str) -> torch.Tensor:
    """‖V_g‖ per group (per entry for the element structure), float64 on V's device."""
    return v.abs().reshape(-1).double() if structure == "element" else \
        group_norms(v, structure).double()


def start_thresholds(before: torch.Tensor, after: torch.Tensor, epochs_left: float,
                     seen_max: float) -> float:
    """λ of one layer: the largest linearly extrapolated ‖V_g‖ ``epochs_left`` epochs after
    ``after`` (the norms one epoch after ``before``), and at least ``seen_max`` (the largest
    norm of the calibration) so that nothing would have entered before."""
    predicted = after + epochs_left * (after - before)
    return max(float(predicted.max()), seen_max * (1 + 1e-9))


def settling_steps(group: dict[str, Any]) -> float:
    """The coupling pull's time constant ν/(κ·lr) in steps at the group's current lr: a group
    the loss does not sustain keeps e⁻¹ of its initial W after this many steps."""
    rate = pull_rate(group)
    return math.inf if rate <= 0 else 1 / rate


def pull_rate(group: dict[str, Any]) -> float:
    """κ·lr/ν: the fraction of W the coupling pulls towards Γ in one step."""
    return float(group["kappa"] * group["lr"] / group["nu"])


def _warn_if_unsettled(pulled: float, pulled_per_epoch: float, calibration: int, start: int
                       ) -> None:
    """Warn when the pull applied before the last calibration epoch, ``pulled`` (Σ κ·lr/ν over
    those steps, for the weakest-pulled layer), adds up to less than one time constant: V's
    growth then still carries W(0)'s decay, and the linear extrapolation sets λ for a start that
    can come epochs late (LeNet-5 on MNIST, calibrated over epoch 1: nothing by epoch 11)."""
    if pulled >= 1:
        return
    if pulled_per_epoch <= 0:
        warnings.warn("selection_start: the coupling pulls nothing (lr or kappa is 0) during "
                      "the calibration, so V does not grow and lambda cannot be calibrated",
                      stacklevel=2)
        return
    needed = 1 + math.ceil(1 / pulled_per_epoch)
    warnings.warn(
        f"selection_start: the pull applied before the last calibration epoch adds up to "
        f"{pulled:.2f} of its time constant nu/(kappa*lr); V's growth still carries the initial "
        f"weights' decay, so selection may start later than epoch {start}: calibrate over "
        f"{needed} epochs (selection_calibration {needed}, selection_start after it) or pull "
        f"harder (a smaller nu)", stacklevel=2)


class StartEpochThresholds(Callback):
    """Calibrate per-layer λ so that every coupled layer starts selecting at epoch ``start``.

    Args:
        start: the epoch ``E`` during which each layer's first groups enter, by the linear
            extrapolation of the module docstring.
        calibration: epochs ``c < E`` (at least 1) measured with nothing selectable.
    """

    def __init__(self, start: int, calibration: int = 1) -> None:
        if calibration < 1 or start <= calibration:
            raise ValueError(f"selection_start {start} must come after the {calibration} "
                             "calibration epoch(s)")
        self.start, self.calibration = int(start), int(calibration)
        self.lams: dict[str, float] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._seen_max: dict[str, torch.Tensor] = {}  # 0-d, on V's device: no sync a step
        # Σ κ·lr/ν of the weakest-pulled coupled group over the calibration's steps, and its
        # value when the last calibration epoch began: has W forgotten W(0) by then?
        self._pulled, self._pulled_before_last = 0.0, 0.0

    @property
    def calibrated(self) -> bool:
        return bool(self.lams)

    def _coupled(self, run: TrainingRun) -> list[tuple[str, dict[str, Any], list[nn.Parameter]]]:
        """(key, group, params) per coupled group: the key is its first tensor's name."""
        out = []
        for group in run.optimizer.param_groups:
            if group.get("structure") is None:
                continue
            if len(group["params"]) != 1 and group["structure"] != "tied":
                raise ValueError("selection_start needs one param group per coupled tensor "
                                 "(dessilbi.selection.split_coupled_groups)")
            out.append((group["param_names"][0], group, list(group["params"])))
        return out

    def _norms(self, run: TrainingRun, coupled: list[tuple[str, dict[str, Any],
                                                          list[nn.Parameter]]] | None = None
               ) -> dict[str, torch.Tensor]:
        """‖V_g‖ per group of every coupled group (joint over a tied group's tensors);
        ``coupled``: :meth:`_coupled`'s list, when the caller has it already."""
        state = run.optimizer.state
        out = {}
        for name, group, params in coupled if coupled is not None else self._coupled(run):
            vs = [state[p]["v"] for p in params if "v" in state.get(p, {})]
            if len(vs) != len(params):
                continue
            squares = sum(_v_norms(v, group["structure"]).square() for v in vs)
            assert isinstance(squares, torch.Tensor)
            out[name] = squares.sqrt()
        return out

    def on_step_end(self, run: TrainingRun) -> None:
        if self.calibrated:
            self._reapply(run)
            return
        coupled = self._coupled(run)
        self._pulled += min((pull_rate(g) for _, g, _ in coupled), default=0.0)
        for name, norms in self._norms(run, coupled).items():  # one reduction per layer
            peak = norms.max()
            seen = self._seen_max.get(name)
            self._seen_max[name] = peak if seen is None else torch.maximum(seen, peak)

    def on_epoch_end(self, run: TrainingRun) -> dict[str, Any] | None:
        if self.calibrated:
            return None
        norms = self._norms(run)
        if run.epoch == self.calibration - 1:
            self._before = {n: t.cpu() for n, t in norms.items()}
            self._pulled_before_last = self._pulled
        if run.epoch < self.calibration:
            return None
        left = self.start - 0.5 - self.calibration
        if run.dist.is_main:
            _warn_if_unsettled(self._pulled_before_last, self._pulled / self.calibration,
                               self.calibration, self.start)
        for name, group, _ in self._coupled(run):
            if name not in norms:
                continue  # no gradient reached it yet: it stays unselectable
            after = norms[name].cpu()
            before = self._before.get(name, torch.zeros_like(after))
            seen = self._seen_max.get(name)
            group["lam"] = self.lams[name] = start_thresholds(
                before, after, left, 0.0 if seen is None else float(seen))
        return {"selection_lam": dict(self.lams)}

    def _reapply(self, run: TrainingRun) -> None:
        """A replaced optimizer (a grown or pruned model) starts at the calibration λ: give its
        groups the calibrated ones again (a few dict lookups a step)."""
        for name, group, _ in self._coupled(run):
            if group["lam"] == CALIBRATING_LAM and name in self.lams:
                group["lam"] = self.lams[name]

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "calibration": self.calibration, "lams": dict(self.lams),
                "before": dict(self._before),
                "seen_max": {n: t.cpu() for n, t in self._seen_max.items()},
                "pulled": [self._pulled, self._pulled_before_last]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["start"], state["calibration"]) != (self.start, self.calibration):
            raise ValueError(f"{self.name}: the run was calibrated for selection_start "
                             f"{state['start']} over {state['calibration']} epoch(s)")
        self.lams = dict(state["lams"])
        self._before = dict(state["before"])
        self._seen_max = dict(state["seen_max"])
        # A checkpoint from before the pull was summed cannot tell: no warning then.
        self._pulled, self._pulled_before_last = state.get("pulled", [math.inf, math.inf])
