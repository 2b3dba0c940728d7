"""Size of ``path.pt`` for the ``imagenet_resnet18`` config over its 100 epochs, computed, not
trained.

Usage: OMP_NUM_THREADS=1 python benchmarks/path_size.py [--epochs 100] [--seed 0]

ResNet-18 for ImageNet (1000 classes, 224x224) gets DessiLBI's param groups of the config
(conv filter groups, the 512x1000 classifier under the element structure). Each simulated epoch
sets every Γ to a random support, then calls ``PathRecorder.update_step`` and ``record_epoch``
as the trainer would:

- each group (filter, or classifier entry) has a fixed random score and is selected at epoch e
  when its score is below a fraction that grows from 0 towards 60 % of the filters and 30 % of
  the classifier's entries (forward selection: the simulated path keeps growing);
- besides, 1 % of the selected groups leave the support at each epoch (and come back later).

It prints the size of the state dict as ``torch.save`` writes it, and the size the version-1
format would have had (float32 norms and bool supports of every group, entry included, every
epoch, and int64 entry step/epoch per group), computed from the group counts. About 10 s on one
CPU thread.
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path

import torch

from dessilbi import DessiLBI, structured_param_groups
from dessilbi.models import build_model
from dessilbi.path_record import PathRecorder, load_path

# ImageNet at the config's batch 256: 1,281,167 images, 5005 steps an epoch.
STEPS_PER_EPOCH = 5005
MB = 1e6


def selected_fraction(structure: str, epoch: int) -> float:
    """The simulated share of selected groups at the end of ``epoch`` (saturating growth)."""
    final = 0.3 if structure == "element" else 0.6
    return final * (1.0 - math.exp(-epoch / 25.0))


def simulate(epochs: int, seed: int) -> tuple[PathRecorder, dict[str, tuple[str, int]]]:
    """Record ``epochs`` simulated epochs; returns the recorder and, per coupled layer, its
    structure and group count."""
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=1000, in_channels=3, image_size=224)
    groups = structured_param_groups(model, conv="filter", linear="element")
    optimizer = DessiLBI(groups, lr=0.1, nu=1000.0, momentum=0.9)
    recorder = PathRecorder(model, optimizer)
    gen = torch.Generator().manual_seed(seed)
    coupled = [(p, g["structure"]) for g in groups if g["structure"] for p in g["params"]]
    score = {p: torch.rand(_grid(p, s), generator=gen) for p, s in coupled}
    for epoch in range(1, epochs + 1):
        for p, structure in coupled:
            leaves = torch.rand(score[p].shape, generator=gen) < 0.01
            support = (score[p] < selected_fraction(structure, epoch)) & ~leaves
            if structure == "filter":
                support = support.view(-1, *[1] * (p.dim() - 1)).expand_as(p)
            optimizer.state[p]["gamma"] = support.to(p.dtype)
        recorder.update_step(epoch * STEPS_PER_EPOCH)
        recorder.record_epoch(epoch)
    layers = {
        name: (structure, score[p].numel())
        for (p, structure), name in zip(coupled, _names(model, coupled), strict=True)
    }
    return recorder, layers


def _grid(p: torch.Tensor, structure: str) -> tuple[int, ...]:
    return tuple(p.shape) if structure == "element" else (p.shape[0],)


def _names(model: torch.nn.Module, coupled: list[tuple[torch.Tensor, str]]) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for p, _ in coupled]


def old_format_bytes(layers: dict[str, tuple[str, int]], epochs: int) -> int:
    """Version 1: per group and epoch a float32 norm and a bool support; per group two int64."""
    return sum(groups * (epochs * (4 + 1) + 2 * 8) for _, groups in layers.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    recorder, layers = simulate(args.epochs, args.seed)
    state = recorder.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    size = buffer.getbuffer().nbytes
    elapsed = time.perf_counter() - started

    fc = [n for n, (s, _) in layers.items() if s == "element"]
    entries = sum(state[k][n].numel() * 4 for n in layers for k in ("entry_step", "entry_epoch"))
    flips = sum(state["support_flips"][n].numel() * 4 for n in fc)
    dense = sum(state["support"][n].numel() * 5 for n in state["support"])
    pictures = sum(t.numel() * 2 for t in state["filter_pictures"].values())
    old = old_format_bytes(layers, args.epochs)
    elements = sum(g for s, g in layers.values() if s == "element")
    filters = sum(g for s, g in layers.values() if s != "element")
    print(f"imagenet_resnet18: {len(layers)} coupled layers, {filters} filters (filter groups), "
          f"{elements} classifier entries (element structure), {args.epochs} epochs")
    print(f"path.pt (format version 2): {size / MB:.2f} MB")
    print(f"  entry step/epoch (int32, every group):        {entries / MB:.2f} MB")
    print(f"  classifier support flips (int32):              {flips / MB:.2f} MB")
    print(f"  filter norms + supports (float32 + bool [E,G]): {dense / MB:.2f} MB")
    print(f"  filter pictures of {state['picture_layer']} (float16):    {pictures / MB:.2f} MB")
    print(f"old dense format (version 1), computed:         {old / MB:.2f} MB "
          f"({old / size:.0f}x larger)")
    # The file reads back: decode the classifier's support at the last epoch from its flips.
    last = _decode_last(buffer.getvalue(), fc[0], args.epochs)
    print(f"decoded support of {fc[0]} at epoch {args.epochs}: {int(last.sum())} of "
          f"{last.numel()} selected; {elapsed:.1f} s")


def _decode_last(data: bytes, name: str, epoch: int) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "path.pt"
        file.write_bytes(data)
        return load_path(file).support(name, epoch)


if __name__ == "__main__":
    main()
