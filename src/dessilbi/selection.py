"""Choosing λ per layer from the epoch at which selection is to start (``selection_start``).

While no group of a layer is selected, Γ = 0 and DessiLBI's V grows by ``(lr/ν)·W_g`` per step,
whatever λ is: ``V_g(t) = Σ_s (lr_s/ν) W_g(s)``, and group ``g`` enters when ‖V_g‖ exceeds
λ_g. Instead of a raw λ the user states the epoch ``E`` (counted from 1) during which every
coupled layer's first groups are to enter. The run is calibrated over its first ``c`` epochs
(``selection_calibration``) with λ = :data:`CALIBRATING_LAM` (nothing can enter); then each
group's V is extrapolated to the middle of epoch ``E`` and each layer gets the λ at which its
fastest group would cross there: ``λ_l = max_g ‖V̂_g(E − ½)‖``.

Two extrapolations (``selection_extrapolation``):

- ``"schedule"`` (the default) splits V into what the initial weights leave in it and what the
  data add. While Γ_g = 0 the coupling pulls W_g by κ·lr/ν a step, so W_g(0) lives on in W_g
  as ``d(t)·W_g(0)``, ``d(t) = Π_s (1 − κ·lr_s/ν)``, and in V as ``o(t)·W_g(0)``,
  ``o(t) = Σ_s (lr_s/ν)·d(s)``, which saturates at W_g(0)/κ. The rest, D_g = V_g − o·W_g(0),
  is what the gradients made of W_g; its growth over the last calibration epoch is scaled by
  the lr the schedule gives until ``E − ½`` (measured with the steps of that epoch)::

      V̂_g = V_g(c) + (o(E − ½) − o(c))·W_g(0) + (L(c, E − ½) / L(c − 1, c))·(D_g(c) − D_g(c − 1)),

  ``L(a, b)`` the sum of the steps' lr from the end of epoch ``a`` to ``b``. It is exact for a
  group the loss does not move, whatever the schedule and however strong the pull.
- ``"linear"`` (the first rule, which the shipped ResNet-20 config was measured with) draws a
  straight line through the norms: ``‖V̂_g‖ = ‖V_g(c)‖ + (E − ½ − c)·(‖V_g(c)‖ − ‖V_g(c − 1)‖)``.
  It ignores the schedule and the saturation of W(0)'s part, so a decaying lr or a pull that
  has not settled by the calibration makes selection start late.

Groups whose W the loss keeps at its size enter near ``E``; groups that the coupling's pull
shrinks (by ``κ·lr/ν`` per step) enter later or never: the order after the start is the data's.

λ_l is never below the largest ‖V_g‖ seen in any step of the calibration, so no group would
have entered during it under λ_l: the run is exactly DessiLBI with these per-layer λ from step 0
(a test checks this bitwise). Only hyperparameters are chosen, one per param group (a coupled
layer each), and they are kept in the optimizer's param groups (so in every checkpoint), in this
callback's state and in ``metrics.jsonl`` (``selection_lam`` at the calibration epoch).

With ``schedule``, the calibration epoch's line also has ``selection_init_share``: per layer,
the part of λ_l that W(0) alone puts into V by the end of the run, ``o(T)·max_g ‖W_g(0)‖ / λ_l``.
Below 1 only the data's part can carry a group over λ_l; at 1 or more the layer selects by its
initialisation, and the calibration warns.
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

__all__ = ["CALIBRATING_LAM", "EXTRAPOLATIONS", "INITIALISATION_DRIVEN_SHARE",
           "StartEpochThresholds", "pull_offset",
           "pull_rate", "settling_steps", "split_coupled_groups", "start_thresholds",
           "start_thresholds_norms"]

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


def start_thresholds_norms(before: torch.Tensor, after: torch.Tensor, epochs_left: float
                           ) -> torch.Tensor:
    """The ``"linear"`` extrapolation: each group's ‖V_g‖ ``epochs_left`` epochs after
    ``after`` (the norms one epoch after ``before``) on the straight line through the two."""
    return after + epochs_left * (after - before)


def start_thresholds(before: torch.Tensor, after: torch.Tensor, epochs_left: float,
                     seen_max: float) -> float:
    """λ of one layer: the largest linearly extrapolated ‖V_g‖ ``epochs_left`` epochs after
    ``after`` (the norms one epoch after ``before``), and at least ``seen_max`` (the largest
    norm of the calibration) so that nothing would have entered before."""
    predicted = start_thresholds_norms(before, after, epochs_left)
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


#: A layer whose initial weights alone bring this share of its λ into V by the end of the run
#: selects by its initialisation, not by the data (docs/selection.md).
INITIALISATION_DRIVEN_SHARE = 1.0


def _warn_if_initialisation_driven(shares: dict[str, float]) -> None:
    """Warn about the layers whose W(0) alone crosses their λ before the run ends: a group
    the loss leaves alone (the one of largest initial norm) enters anyway, and the layer's
    order of entry is that of the initial norms more than the data's."""
    driven = {n: s for n, s in shares.items() if s >= INITIALISATION_DRIVEN_SHARE}
    if not driven:
        return
    listed = ", ".join(f"{n} ({s:.2f})" for n, s in sorted(driven.items(), key=lambda x: -x[1]))
    warnings.warn(
        f"selection_start: the initial weights alone carry {len(driven)} layer(s) over their "
        f"lambda by the end of the run (W(0)'s part of V / lambda: {listed}): a filter the "
        "loss leaves alone enters anyway, and the order of entry follows the initial norms. "
        "Start after more of the pull's time constants nu/(kappa*lr) (a later "
        "selection_calibration and selection_start, a smaller batch_size), or start the "
        "filters smaller (filter_norm_scale, behind batch norms)", stacklevel=2)


#: The extrapolations of ``selection_extrapolation`` (module docstring).
EXTRAPOLATIONS = ("schedule", "linear")


def pull_offset(lrs: list[float] | tuple[float, ...], kappa: float, nu: float,
                start: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """``(o, d)`` after steps at the learning rates ``lrs``, from ``start``: how much of W(0)
    the coupling's pull has put into V (``o``, in units of W(0)) and left in W (``d``)."""
    offset, left = start
    for lr in lrs:
        offset += lr / nu * left
        left *= 1 - kappa * lr / nu
    return offset, left


def _future_pull(group: dict[str, Any], run: TrainingRun, epoch: int, target: float,
                 steps: int, state: tuple[float, float]) -> tuple[float, float]:
    """``(o, L)`` from the end of epoch ``epoch`` to ``target`` (an epoch, may end in ½):
    W(0)'s growth of V, and the sum of the steps' lr, at the schedule's lr and ``steps`` steps
    an epoch (the epoch's lr is constant, so each is a geometric series)."""
    offset, left = state
    lr_sum, e = 0.0, epoch
    base = group.get("initial_lr", group["lr"])
    while e < target:
        n = steps * min(1.0, target - e)
        lr = base * run.lr_multiplier(e)  # epoch e + 1 (counted from 1) runs at multiplier(e)
        rate = group["kappa"] * lr / group["nu"]
        decayed = (1 - rate) ** n
        offset += left * (1 - decayed) / group["kappa"] if rate > 0 else 0.0
        left *= decayed
        lr_sum += lr * n
        e += 1
    return offset - state[0], lr_sum


class StartEpochThresholds(Callback):
    """Calibrate per-layer λ so that every coupled layer starts selecting at epoch ``start``.

    Args:
        start: the epoch ``E`` during which each layer's first groups enter, by the
            extrapolation of the module docstring.
        calibration: epochs ``c < E`` (at least 1) measured with nothing selectable.
        extrapolation: ``"schedule"`` or ``"linear"`` (module docstring).
    """

    def __init__(self, start: int, calibration: int = 1, extrapolation: str = "schedule"
                 ) -> None:
        if calibration < 1 or start <= calibration:
            raise ValueError(f"selection_start {start} must come after the {calibration} "
                             "calibration epoch(s)")
        if extrapolation not in EXTRAPOLATIONS:
            raise ValueError(f"selection_extrapolation {extrapolation!r}: one of "
                             f"{', '.join(EXTRAPOLATIONS)}")
        self.start, self.calibration = int(start), int(calibration)
        self.extrapolation = extrapolation
        self.lams: dict[str, float] = {}
        self._initial: dict[str, list[torch.Tensor]] = {}  # W(0) of each coupled group
        self._v_before: dict[str, list[torch.Tensor]] = {}  # V at the end of epoch c − 1
        self._seen_max: dict[str, torch.Tensor] = {}  # 0-d, on V's device: no sync a step
        # Per group: (o, d) of pull_offset since step 0, and o and Σ lr when epoch c began.
        self._offset: dict[str, tuple[float, float]] = {}
        self._marks: dict[str, tuple[float, float]] = {}
        self._lr_sums: dict[str, float] = {}
        self._steps = 0  # steps of the current epoch
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

    def _vs(self, run: TrainingRun, coupled: list[tuple[str, dict[str, Any],
                                                      list[nn.Parameter]]] | None = None
            ) -> dict[str, tuple[dict[str, Any], list[torch.Tensor]]]:
        """(group, V of each tensor) of every coupled group whose tensors all have a V;
        ``coupled``: :meth:`_coupled`'s list, when the caller has it already."""
        state = run.optimizer.state
        out = {}
        for name, group, params in coupled if coupled is not None else self._coupled(run):
            vs = [state[p]["v"] for p in params if "v" in state.get(p, {})]
            if len(vs) == len(params):
                out[name] = (group, vs)
        return out

    def _norms(self, run: TrainingRun, coupled: list[tuple[str, dict[str, Any],
                                                          list[nn.Parameter]]] | None = None
               ) -> dict[str, torch.Tensor]:
        """‖V_g‖ per group of every coupled group (joint over a tied group's tensors)."""
        return {name: _joint_norms(vs, group["structure"])
                for name, (group, vs) in self._vs(run, coupled).items()}

    def on_train_start(self, run: TrainingRun) -> None:
        if self.calibrated or self._initial or self.extrapolation != "schedule":
            return  # calibrated, resumed (the state holds W(0)), or W(0) not needed
        self._initial = {name: [p.detach().clone() for p in params]
                         for name, _, params in self._coupled(run)}

    def on_step_end(self, run: TrainingRun) -> None:
        if self.calibrated:
            self._reapply(run)
            return
        coupled = self._coupled(run)
        self._pulled += min((pull_rate(g) for _, g, _ in coupled), default=0.0)
        self._steps += 1
        for name, group, _ in coupled:
            self._offset[name] = pull_offset((group["lr"],), group["kappa"], group["nu"],
                                             self._offset.get(name, (0.0, 1.0)))
            self._lr_sums[name] = self._lr_sums.get(name, 0.0) + group["lr"]
        for name, norms in self._norms(run, coupled).items():  # one reduction per layer
            peak = norms.max()
            seen = self._seen_max.get(name)
            self._seen_max[name] = peak if seen is None else \
                torch.maximum(seen.to(peak.device), peak)  # a checkpoint's is on the CPU

    def on_epoch_end(self, run: TrainingRun) -> dict[str, Any] | None:
        if self.calibrated:
            return None
        steps, self._steps = self._steps, 0
        if run.epoch == self.calibration - 1:
            self._v_before = {n: [v.detach().clone() for v in vs]
                              for n, (_, vs) in self._vs(run).items()}
            self._marks = {n: (self._offset[n][0], self._lr_sums[n]) for n in self._offset}
            self._pulled_before_last = self._pulled
        if run.epoch < self.calibration:
            return None
        if run.dist.is_main:
            _warn_if_unsettled(self._pulled_before_last, self._pulled / self.calibration,
                               self.calibration, self.start)
        shares = {}
        for name, (group, vs) in self._vs(run).items():
            predicted = self._predicted_norms(run, name, group, vs, steps)
            seen = self._seen_max.get(name)
            group["lam"] = self.lams[name] = max(
                float(predicted.max()), (0.0 if seen is None else float(seen)) * (1 + 1e-9))
            share = self._initial_share(run, name, group, steps)
            if share is not None:
                shares[name] = share
        # Groups no gradient reached yet have no V: they stay unselectable.
        self._initial, self._v_before = {}, {}  # not needed any more, nor in checkpoints
        if run.dist.is_main:
            _warn_if_initialisation_driven(shares)
        line: dict[str, Any] = {"selection_lam": dict(self.lams)}
        if shares:
            line["selection_init_share"] = shares
        return line

    def _initial_share(self, run: TrainingRun, name: str, group: dict[str, Any], steps: int
                       ) -> float | None:
        """``o(T)·max_g ‖W_g(0)‖ / λ_l``: how much of the layer's λ the initial weights alone
        put into V by the end of the run (T); at 1 or more, a group the loss never moves
        still enters. Known only where W(0) is kept (the ``schedule`` extrapolation)."""
        initial = self._initial.get(name)
        lam = self.lams.get(name, 0.0)
        shapes = [p.shape for p in group["params"]]
        if not initial or lam <= 0 or [w.shape for w in initial] != shapes:
            return None  # not kept (linear), or the layer changed shape during the calibration
        offset = self._offset.get(name, (0.0, 1.0))
        rest, _ = _future_pull(group, run, self.calibration, run.config.epochs, steps, offset)
        largest = float(_joint_norms(initial, group["structure"]).max())
        return (offset[0] + rest) * largest / lam

    def _predicted_norms(self, run: TrainingRun, name: str, group: dict[str, Any],
                         vs: list[torch.Tensor], steps: int) -> torch.Tensor:
        """‖V̂_g(E − ½)‖ per group by the run's extrapolation (module docstring)."""
        # Kept on the CPU in a checkpoint: back to V's device (a resumed GPU run).
        before = [b.to(v.device) for b, v in zip(self._v_before[name], vs, strict=True)] \
            if self._v_before.get(name) else [torch.zeros_like(v) for v in vs]
        structure = group["structure"]
        if self.extrapolation == "linear":
            return start_thresholds_norms(_joint_norms(before, structure),
                                          _joint_norms(vs, structure),
                                          self.start - 0.5 - self.calibration)
        offset_before, lr_sum_before = self._marks.get(name, (0.0, 0.0))
        offset = self._offset.get(name, (0.0, 1.0))
        lr_sum_last = self._lr_sums.get(name, 0.0) - lr_sum_before
        future_offset, future_lr = _future_pull(group, run, self.calibration,
                                                self.start - 0.5, steps, offset)
        scale = future_lr / lr_sum_last if lr_sum_last > 0 else 0.0
        initial = self._initial.get(name, [])
        predicted = []
        for k, (v, v_before) in enumerate(zip(vs, before, strict=True)):
            w0 = initial[k].to(v.device, v.dtype) if k < len(initial) and \
                initial[k].shape == v.shape else torch.zeros_like(v)
            data_growth = (v - v_before) - (offset[0] - offset_before) * w0
            predicted.append(v + future_offset * w0 + scale * data_growth)
        return _joint_norms(predicted, structure)

    def _reapply(self, run: TrainingRun) -> None:
        """A replaced optimizer (a grown or pruned model) starts at the calibration λ: give its
        groups the calibrated ones again (a few dict lookups a step)."""
        for name, group, _ in self._coupled(run):
            if group["lam"] == CALIBRATING_LAM and name in self.lams:
                group["lam"] = self.lams[name]

    def state_dict(self) -> dict[str, Any]:
        def cpu(tensors: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
            return {n: [t.cpu() for t in ts] for n, ts in tensors.items()}

        return {"start": self.start, "calibration": self.calibration,
                "extrapolation": self.extrapolation, "lams": dict(self.lams),
                "initial": cpu(self._initial), "v_before": cpu(self._v_before),
                "seen_max": {n: t.cpu() for n, t in self._seen_max.items()},
                "offset": dict(self._offset), "marks": dict(self._marks),
                "lr_sums": dict(self._lr_sums), "steps": self._steps,
                "pulled": [self._pulled, self._pulled_before_last]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints from before the choice of extrapolation were calibrated by the line.
        saved = (state["start"], state["calibration"], state.get("extrapolation", "linear"))
        if saved != (self.start, self.calibration, self.extrapolation):
            raise ValueError(f"{self.name}: the run was calibrated for selection_start "
                             f"{saved[0]} over {saved[1]} epoch(s) with the {saved[2]} "
                             f"extrapolation; resume it with the same settings")
        self.lams = dict(state["lams"])
        if not self.lams and "v_before" not in state:
            raise ValueError(f"{self.name}: the checkpoint was written during the calibration "
                             "by an earlier version, which kept too little to finish it; start "
                             "the run again")
        self._initial = dict(state.get("initial", {}))
        self._v_before = dict(state.get("v_before", {}))
        self._seen_max = dict(state["seen_max"])
        self._offset = dict(state.get("offset", {}))
        self._marks = dict(state.get("marks", {}))
        self._lr_sums = dict(state.get("lr_sums", {}))
        self._steps = int(state.get("steps", 0))
        # A checkpoint from before the pull was summed cannot tell: no warning then.
        self._pulled, self._pulled_before_last = state.get("pulled", [math.inf, math.inf])


def _joint_norms(tensors: list[torch.Tensor], structure: str) -> torch.Tensor:
    """Group norms over a group's tensors (a tied group's filters span several), float64."""
    squares = sum(_v_norms(t, structure).square() for t in tensors)
    assert isinstance(squares, torch.Tensor)
    return squares.sqrt()
