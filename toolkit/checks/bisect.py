"""Find where two ONNX graphs start to disagree: the first shared intermediate tensor beyond its tolerance.

Every node output of both graphs is exposed as a graph output (ONNX Runtime returns any tensor added
to ``graph.output``), both run on the same inputs, and the tensors present in both graphs under the same
name are compared in the topological order of the first graph. Matching is by tensor name only: that
suits an fp32 graph against its fp16 conversion, a simplified graph, or two exports of one model. A
torch model is compared through a fresh export of it (the export names tensors after the module path);
torch forward hooks are not matched to ONNX tensors.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..signature import INPUT_IMAGES, INPUT_SIZES


@dataclass
class TensorDiff:
    """One shared tensor: the node that produced it, its op, and the difference against its tolerance."""

    tensor: str
    node: str
    op: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class BisectReport:
    """``first``: the first shared tensor (topological order of graph A) beyond tolerance, None when all agree."""

    compared: int
    first: TensorDiff | None
    diffs: list[TensorDiff] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # shared names whose shapes or dtypes differ

    @property
    def ok(self) -> bool:
        return self.first is None

    def summary(self) -> str:
        if self.first is None:
            return f"bisect: {self.compared} shared tensors agree"
        f = self.first
        return (f"bisect: first difference at tensor {f.tensor!r} (node {f.node!r}, op {f.op}): max |diff| "
                f"{f.max_abs_diff:.3g} > tolerance {f.tolerance:.3g}; {self.compared} shared tensors compared")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "compared": self.compared, "first": asdict(self.first) if self.first else None,
                "skipped": self.skipped}


def _with_all_outputs(path: Path) -> tuple[Any, list[tuple[str, str, str]]]:
    """The model with every node output exposed, and (tensor, node name, op) in topological order."""
    import onnx

    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    order = []
    for node in model.graph.node:  # ONNX requires nodes to be stored topologically sorted
        for out in node.output:
            if out:
                order.append((out, node.name or out, node.op_type))
                if out not in existing:
                    model.graph.output.append(onnx.ValueInfoProto(name=out))
    return model, order


def _run_all(model: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name: i.type for i in session.get_inputs()}
    typed = {k: v.astype({"tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(float16)": "float16",
                          "tensor(float)": "float32"}.get(wanted[k], v.dtype.name)) for k, v in feeds.items() if k in wanted}
    return dict(zip(names, session.run(names, typed)))


def bisect_onnx(onnx_a: str | Path, onnx_b_or_torch_model: Any, images: Sequence[str | Path] | torch.Tensor | None = None,
                *, atol: float = 1e-3, rtol: float = 1e-2) -> BisectReport:
    """Run both graphs on the same inputs; report the first shared tensor whose max |a - b| exceeds
    ``atol + rtol * max|a|`` (integer tensors must be equal).

    ``images``: image files (preprocessed with graph A's preprocessing), an ``images`` tensor [N,3,H,W],
    or None for the synthetic images of :func:`toolkit.checks.sides.synthetic_images`. Raise the tolerances for
    fp32 vs fp16 graphs (``rtol=5e-2``).
    """
    import numpy as np

    from ..runtime.preprocessing import list_images, preprocess
    from ..signature import from_onnx
    from .sides import synthetic_images

    path_a = Path(onnx_a)
    if not path_a.is_file():
        raise InputError(f"{path_a}: no such ONNX file")
    spec = from_onnx(path_a).preprocess
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(onnx_b_or_torch_model, torch.nn.Module):
            from ..export.onnx import export_onnx

            path_b = Path(tmp) / "torch_export.onnx"
            export_onnx(onnx_b_or_torch_model, path_b, verify=False)
        else:
            path_b = Path(onnx_b_or_torch_model)
            if not path_b.is_file():
                raise InputError(f"{path_b}: no such ONNX file")
        if isinstance(images, torch.Tensor):
            batch = images.float()
            sizes = torch.tensor([[batch.shape[-1], batch.shape[-2]]] * len(batch))
        else:
            if spec is None:
                raise InputError(f"{path_a} declares no preprocessing: pass an images tensor [N,3,H,W]")
            paths = list_images([images] if isinstance(images, (str, Path)) else images) if images is not None else synthetic_images(tmp)
            batch, sizes = preprocess(list(paths), spec)
        feeds = {INPUT_IMAGES: batch.numpy(), INPUT_SIZES: sizes.numpy()}
        model_a, order = _with_all_outputs(path_a)
        model_b, order_b = _with_all_outputs(path_b)
        out_a, out_b = _run_all(model_a, feeds), _run_all(model_b, feeds)
    shared = {t for t, _, _ in order_b}
    diffs, skipped = [], []
    for tensor, node, op in order:
        if tensor not in shared or tensor not in out_a or tensor not in out_b:
            continue
        a, b = np.asarray(out_a[tensor]), np.asarray(out_b[tensor])
        if a.shape != b.shape or (a.dtype.kind in "iub") != (b.dtype.kind in "iub"):
            skipped.append(tensor)
            continue
        if a.size == 0:
            continue
        if a.dtype.kind in "iub":
            diff, tol = float(np.abs(a.astype(np.int64) - b.astype(np.int64)).max()), 0.0
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            diff = float(np.nan_to_num(np.abs(a64 - b64), nan=np.inf).max())
            tol = atol + rtol * float(np.nan_to_num(np.abs(a64), posinf=0, neginf=0).max())
        diffs.append(TensorDiff(tensor, node, op, diff, tol))
    first = next((d for d in diffs if not d.ok), None)
    return BisectReport(len(diffs), first, diffs, skipped)
