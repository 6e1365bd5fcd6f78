"""rtdetr-deploy: export, build, run and compare RT-DETR detectors with torch tensors bound to engine I/O.

``import toolkit`` is light: heavy libraries (onnx, onnxruntime, transformers, tensorrt) load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "TensorSpec": "signature", "Signature": "signature", "PreprocessSpec": "signature",
    "BindingError": "errors", "ToolkitError": "errors", "ExportError": "errors", "EngineError": "errors",
    "ConfigError": "errors", "CheckpointError": "errors", "InputError": "errors", "IntegrityError": "errors",
    "MissingDependencyError": "errors",
    "Binder": "runtime.binding",
    "load_model": "models.loading", "build_model": "models.config", "available_configs": "models.config",
    "preprocess": "runtime.preprocessing", "read_image": "runtime.preprocessing",
    "export_onnx": "export.onnx",
    "inspect_file": "tasks.inspect",
    "load": "runtime.engine", "Engine": "runtime.base",
    "compare": "checks.compare", "CompareReport": "checks.report",
    "quantize": "tasks.quantize",
    "export_triton": "serve.repository",
}
__all__ = sorted(_EXPORTS) + ["__version__", "serve"]


def __getattr__(name: str) -> Any:
    if name == "serve":  # the package itself is callable: toolkit.serve(model, ...)
        return import_module(".serve", __name__)
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
