"""ONNX export of a trained (or compact) network, checked against onnxruntime on CPU.

Needs the ``export`` extra (``pip install 'dessilbi[export]'``: onnx, onnxscript for torch's
exporter, onnxruntime for the check).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["ExportError", "export_onnx"]

#: The largest batch the exported graph is declared for (the batch dimension is dynamic).
MAX_BATCH = 4096


class ExportError(RuntimeError):
    """The export failed, or the exported graph disagrees with the PyTorch model."""


def export_onnx(model: nn.Module, example_inputs: torch.Tensor, file: str | os.PathLike[str],
                tolerance: float = 1e-4) -> float:
    """Write ``model`` (eval mode, fp32, on CPU) as ONNX with a dynamic batch dimension and
    check it with onnxruntime at batch 1 and 3 against PyTorch; return the largest absolute
    difference seen.

    Raises:
        ImportError: without the ``export`` extra.
        ExportError: a difference above ``tolerance`` (the file is removed then).
    """
    try:
        import onnxruntime  # type: ignore[import-untyped]  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError("ONNX export needs: pip install 'dessilbi[export]'") from exc
    path = Path(file)
    model = model.eval().float().cpu()
    example = example_inputs.float().cpu()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(model, (example,), str(path), dynamic_shapes=({0: batch},),
                          dynamo=True, verbose=False)
    difference = _check(model, example, path)
    if difference > tolerance:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: onnxruntime differs from PyTorch by {difference:.3g} "
                          f"(> {tolerance:g}); not written")
    return difference


def _check(model: nn.Module, example: torch.Tensor, path: Path) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for size in (1, 3):
        x = torch.randn(size, *example.shape[1:], generator=gen)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        worst = max(worst, float((got - expected).abs().max()))
    return worst
