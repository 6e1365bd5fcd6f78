"""Torch-TensorRT programs (``.ep`` from ``rtdetr-deploy build --backend torch-tensorrt``) behind the Engine protocol.

The sidecar (``MODEL.ep.json``) gives the signature, class names, the GPU architecture and the Torch-TensorRT
and TensorRT versions the program was built with. The TensorRT engines inside run only on a CUDA GPU of that
compute capability, under those versions: anything else is refused before the program is loaded.

``torch_tensorrt`` is imported when an engine is created: the import registers the TensorRT runtime ops
(``tensorrt::execute_engine``) that the saved program calls.

Streams (CUDA): the program runs on the torch stream current at call time (Torch-TensorRT orders its engine
stream after it), so outputs are valid in the order of the caller's stream, like any torch op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import EngineError
from ...numerics import tf32
from ...signature import OUTPUTS, Signature
from ..base import BaseEngine
from ..binding import BoundInputs
from ..sidecar import read_sidecar

BACKEND = "torch-tensorrt"
INSTALL_HINT = "pip install 'rtdetr-deploy[torch-tensorrt]'"


def _import_torch_tensorrt(path: Path) -> Any:
    try:
        import torch_tensorrt
    except ImportError as e:
        raise EngineError(f"{path} needs Torch-TensorRT, which is not installed ({e}): {INSTALL_HINT}") from None
    return torch_tensorrt


def tensorrt_version() -> str | None:
    """The TensorRT that Torch-TensorRT runs on (``tensorrt`` may be its proxy for ``tensorrt_rtx``); None if unknown."""
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", None)


def _check_gpu(path: Path, meta: dict[str, Any], device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        raise EngineError(f"{path} runs TensorRT engines, which need a CUDA GPU; this torch sees none")
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    here = "{}.{}".format(*torch.cuda.get_device_capability(device))
    if meta.get("compute_capability") != here:
        raise EngineError(f"{path} was built for compute capability {meta.get('compute_capability')} ({meta.get('gpu_name')}); "
                          f"{device} is {torch.cuda.get_device_name(device)} (compute capability {here}): TensorRT engines "
                          "hold code for one GPU architecture, rebuild it on this GPU")
    return device


def _check_versions(path: Path, meta: dict[str, Any], ttrt: Any) -> None:
    built = (meta.get("torch_tensorrt_version"), meta.get("tensorrt_version"))
    here = (ttrt.__version__, tensorrt_version())
    if built != here:
        raise EngineError(f"{path} was built with Torch-TensorRT {built[0]} (TensorRT {built[1]}); this is Torch-TensorRT "
                          f"{here[0]} (TensorRT {here[1]}): TensorRT engines are not portable across versions. Rebuild it "
                          f"here, or install torch-tensorrt=={built[0]}")


class TorchTensorRTEngine(BaseEngine):
    """A saved Torch-TensorRT ExportedProgram: TensorRT engines for the supported subgraphs, PyTorch for the rest."""

    backend = BACKEND

    def __init__(self, path: str | Path, device: torch.device | None = None, **options: Any) -> None:
        path = Path(path)
        meta = read_sidecar(path)
        if meta.get("backend") != BACKEND:
            raise EngineError(f"{path}: its sidecar is for backend {meta.get('backend')!r}, not a Torch-TensorRT program")
        try:
            signature = Signature.from_dict(meta["signature"])
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{path}: its sidecar has no valid signature ({e.__class__.__name__}: {e}); rebuild the program") from None
        device = device or torch.device("cuda")
        if device.type != "cuda":
            raise EngineError(f"{path} holds TensorRT engines, which run on NVIDIA GPUs only: it cannot run on {device.type}; "
                              "load it with device='cuda', or build a CPU package with 'rtdetr-deploy build --backend aoti --device cpu'")
        ttrt = _import_torch_tensorrt(path)
        device = _check_gpu(path, meta, device)
        _check_versions(path, meta, ttrt)
        try:
            self.module = ttrt.load(str(path)).module()
        except Exception as e:
            raise EngineError(f"{path}: Torch-TensorRT cannot load it ({e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0]}); "
                              "a corrupted or truncated file needs a rebuild") from None
        super().__init__(signature, device, class_names=meta.get("class_names"), **options)
        self.path = path
        self.precision = meta.get("precision", "fp32")

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        # the engines were built without TF32; ops left to PyTorch compute in exact fp32 too
        with torch.inference_mode(), tf32(False):
            out = self.module(*(bound.tensors[spec.name] for spec in self.signature.inputs))
        result = {name: out[name] for name in OUTPUTS} if isinstance(out, dict) else dict(zip(OUTPUTS, out))
        return self._into_callers(result, bound)

    def close(self) -> None:
        self.module = None


def load(source: Any, device: torch.device | None = None, **options: Any) -> TorchTensorRTEngine:
    return TorchTensorRTEngine(source, device, **options)
