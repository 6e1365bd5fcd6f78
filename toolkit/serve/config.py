"""``config.pbtxt`` from a :class:`~toolkit.signature.Signature`, and its structural check.

The config is generated, never hand-written, so Triton declares exactly what the artifact declares:
``TYPE_INT32`` for an int32 ``orig_target_sizes`` and ``TYPE_INT64`` for an int64 one (Triton then refuses
the other datatype at the door), ``max_batch_size`` from the engine's batch bound, dims without the batch,
dynamic batching, and one instance group per listed GPU. The toolkit's full signature (preprocessing,
bounds) and class names ride along as config parameters, where :mod:`toolkit.runtime.backends.triton`
reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ExportError, InputError, MissingDependencyError
from ..runtime.backends.triton import CLASS_NAMES_PARAMETER, SIGNATURE_PARAMETER, config_datatype
from ..signature import Signature, TensorSpec

PLATFORMS = {"onnxruntime": ('backend: "onnxruntime"', "model.onnx"), "tensorrt": ('platform: "tensorrt_plan"', "model.plan"),
             "python": ('backend: "python"', "model.py")}


@dataclass
class TritonConfig:
    """Everything that goes into one model's ``config.pbtxt``."""

    name: str
    kind: str  # onnxruntime, tensorrt or python
    signature: Signature
    max_batch: int = 32
    max_queue_delay_us: int = 1000
    instances: int = 1
    devices: Sequence[int] | None = None  # GPUs: one instance group each; None: CPU instances
    class_names: list[str] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)


def batch_limit(signature: Signature, requested: int) -> int:
    """``max_batch_size``: the request, capped by the engine's own batch bound; 0 is refused (the toolkit batches)."""
    dims = {t.shape[0] for t in signature.inputs + signature.outputs if t.shape}
    if len(dims) != 1 or not isinstance(next(iter(dims)), str):
        raise InputError("the model has no shared dynamic batch dim; export it with --dynamic-batch to serve it with batching")
    lo, hi = signature.bounds(str(next(iter(dims))))
    if requested < 1:
        raise InputError(f"--max-batch must be at least 1, got {requested}")
    return min(requested, hi) if hi else requested


def _dims(spec: TensorSpec) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) and d >= 0 else "-1" for d in spec.shape[1:]) + " ]"


def _tensor(spec: TensorSpec) -> str:
    return f'  {{\n    name: "{spec.name}"\n    data_type: {config_datatype(spec.dtype)}\n    dims: {_dims(spec)}\n  }}'


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid protobuf text-format string


def render(config: TritonConfig) -> str:
    """The text of ``config.pbtxt``."""
    if config.kind not in PLATFORMS:
        raise InputError(f"unknown Triton backend {config.kind!r}; choose {', '.join(PLATFORMS)}")
    sig = config.signature
    max_batch = batch_limit(sig, config.max_batch)
    if config.instances < 1:
        raise InputError(f"--instances must be at least 1, got {config.instances}")
    lines = [f'name: "{config.name}"', PLATFORMS[config.kind][0], f"max_batch_size: {max_batch}",
             "input [\n" + ",\n".join(_tensor(t) for t in sig.inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor(t) for t in sig.outputs) + "\n]"]
    preferred = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch} | {max_batch})
    lines.append("dynamic_batching {\n  preferred_batch_size: [ " + ", ".join(map(str, preferred)) + " ]\n"
                 f"  max_queue_delay_microseconds: {int(config.max_queue_delay_us)}\n}}")
    if config.devices:
        groups = [f"  {{\n    count: {config.instances}\n    kind: KIND_GPU\n    gpus: [ {int(g)} ]\n  }}" for g in config.devices]
    else:
        groups = [f"  {{\n    count: {config.instances}\n    kind: KIND_CPU\n  }}"]
    lines.append("instance_group [\n" + ",\n".join(groups) + "\n]")
    params = {SIGNATURE_PARAMETER: sig.to_json(), CLASS_NAMES_PARAMETER: json.dumps(config.class_names), **config.parameters}
    for key, value in params.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {_quote(value)} }}\n}}')
    return "\n".join(lines) + "\n"


def parse(text: str) -> Any:
    """``config.pbtxt`` parsed with Triton's own protobuf definitions (tritonclient's ``model_config_pb2``)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingDependencyError("checking a Triton config needs tritonclient: pip install 'rtdetr-deploy[serve]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ExportError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from None


def check(text: str, signature: Signature) -> Any:
    """Parse ``config.pbtxt`` and check it declares exactly the signature (names, TYPE_*, dims); returns the message."""
    from tritonclient.grpc import model_config_pb2

    cfg = parse(text)
    for kind, want, got in (("input", signature.inputs, cfg.input), ("output", signature.outputs, cfg.output)):
        served = {t.name: t for t in got}
        if set(served) != {t.name for t in want}:
            raise ExportError(f"config.pbtxt {kind}s {sorted(served)} are not the model's {[t.name for t in want]}")
        for spec in want:
            t = served[spec.name]
            datatype = model_config_pb2.DataType.Name(t.data_type)
            dims = [int(d) if isinstance(d, int) and d >= 0 else -1 for d in spec.shape[1:]]
            if datatype != config_datatype(spec.dtype) or list(t.dims) != dims:
                raise ExportError(f"config.pbtxt declares {spec.name} as {datatype} {list(t.dims)}, "
                                  f"the model {config_datatype(spec.dtype)} {dims}")
    if cfg.max_batch_size < 1 or not cfg.HasField("dynamic_batching") or not cfg.instance_group:
        raise ExportError("config.pbtxt lacks max_batch_size, dynamic_batching or instance groups")
    return cfg
