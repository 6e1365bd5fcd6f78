"""A model served by Triton Inference Server behind the Engine protocol: ``load("grpc://host:8001/MODEL")``.

The signature is read from the server itself (model metadata: names, exact datatypes, ``-1`` batch dims;
model config: ``max_batch_size`` and, for models the toolkit serves, the preprocessing and class names),
so the binder checks and converts every tensor against what the *deployment* declares before anything is
sent: an int64 ``orig_target_sizes`` for a TYPE_INT32 model is narrowed after its values are checked, or
refused, exactly as for a local engine.

Responses are never trusted: each output must be present, of the declared datatype, of the shape the
inputs imply, and carry exactly ``numel * itemsize`` bytes. A python-backend model that answers through numpy
in a stub with numpy >= 2 sends shapes but *empty* contents and no error (the toolkit's own model passes tensors by
DLPack and is immune); that is an :class:`~toolkit.errors.EngineError` here.

Devices: inputs may be on any device (they leave through host memory); outputs come back on the engine's
``device`` (``load(url, device="cuda")``).

Threads: one tritonclient client per thread (a shared HTTP client hangs under concurrent calls).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import torch

from ... import dtypes
from ...errors import EngineError, MissingDependencyError
from ...signature import Signature, TensorSpec
from ..base import BaseEngine
from ..binding import Binder, BoundInputs, resolve_shape

# canonical dtype name <-> Triton's wire datatype (metadata, requests) and config enum (config.pbtxt)
TRITON_DATATYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP64", "int64": "INT64",
                    "int32": "INT32", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
FROM_TRITON = {v: k for k, v in TRITON_DATATYPES.items()}
SCHEMES = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
SIGNATURE_PARAMETER = "rtdetr_deploy_signature"  # config parameter carrying the toolkit's full Signature JSON
CLASS_NAMES_PARAMETER = "rtdetr_deploy_class_names"
BATCH = "N"


def is_url(source: Any) -> bool:
    """True for ``grpc://...`` and ``http://...`` strings: a served model, not a file."""
    return isinstance(source, str) and source.split("://", 1)[0].lower() in SCHEMES and "://" in source


def config_datatype(dtype: str) -> str:
    """``int32`` -> ``TYPE_INT32`` (config.pbtxt spelling)."""
    return "TYPE_" + ("STRING" if dtype == "bytes" else TRITON_DATATYPES[dtypes.get(dtype).name])


def import_client(scheme: str) -> Any:
    try:
        if scheme == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError:
        raise MissingDependencyError("serving needs tritonclient: pip install 'rtdetr-deploy[serve]'") from None
    return client


@dataclass(frozen=True)
class ModelURL:
    scheme: str
    host: str
    port: int
    model: str
    version: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}/{self.model}" + (f"/{self.version}" if self.version else "")


def parse_url(url: str) -> ModelURL:
    """``grpc://host:8001/MODEL[/VERSION]`` (``http://host:8000/MODEL``; ``/v2/models/MODEL`` is accepted too)."""
    u = urlparse(url)
    scheme = u.scheme.lower()
    parts = [p for p in u.path.split("/") if p]
    if parts[:2] == ["v2", "models"]:
        parts = parts[2:]
        if len(parts) >= 3 and parts[1] == "versions":
            parts = [parts[0], parts[2]]
    if scheme not in SCHEMES or not u.hostname or not 1 <= len(parts) <= 2:
        raise EngineError(f"{url}: a served model is grpc://HOST:PORT/MODEL or http://HOST:PORT/MODEL")
    try:
        port = u.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise EngineError(f"{url}: the port is not a number") from None
    return ModelURL(scheme, u.hostname, port, parts[0], parts[1] if len(parts) == 2 else "")


def _as_dict(message: Any) -> dict[str, Any]:
    """gRPC protobuf replies and HTTP JSON replies as one dict shape."""
    if isinstance(message, dict):
        return message
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def signature_from_server(metadata: dict[str, Any], config: dict[str, Any], url: Any) -> tuple[Signature, list[str]]:
    """The served signature: datatypes and shapes from the server's metadata; bounds from ``max_batch_size``."""
    config = config.get("config", config)
    max_batch = int(config.get("max_batch_size", 0) or 0)
    params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}

    def spec(t: dict[str, Any]) -> TensorSpec:
        if t["datatype"] not in FROM_TRITON:
            raise EngineError(f"{url}: tensor {t['name']} has datatype {t['datatype']}, which the toolkit does not bind")
        shape = [int(d) for d in t.get("shape", [])]
        if max_batch > 0:  # metadata includes the batch dim as -1 when the model batches
            shape = shape if shape and shape[0] == -1 else [-1] + shape
        dims = tuple(BATCH if (i == 0 and max_batch > 0) else (d if d >= 0 else f"d{i}") for i, d in enumerate(shape))
        return TensorSpec(t["name"], FROM_TRITON[t["datatype"]], dims)

    inputs = tuple(spec(t) for t in metadata.get("inputs", []))
    outputs = tuple(spec(t) for t in metadata.get("outputs", []))
    preprocess = None
    if SIGNATURE_PARAMETER in params:
        declared = Signature.from_json(params[SIGNATURE_PARAMETER])
        for mine in declared.inputs + declared.outputs:
            served = {t.name: t for t in inputs + outputs}.get(mine.name)
            if served is None or served.dtype != mine.dtype:
                raise EngineError(f"{url}: the model's metadata says {served.describe() if served else 'nothing'} for "
                                  f"{mine.name} but its engine declares {mine.describe()}: the repository is inconsistent")
        preprocess = declared.preprocess
    names = json.loads(params[CLASS_NAMES_PARAMETER]) if params.get(CLASS_NAMES_PARAMETER) else []
    bounds = {BATCH: (1, max_batch)} if max_batch > 0 else {}
    return Signature(inputs, outputs, bounds, preprocess), names


class TritonEngine(BaseEngine):
    backend = "triton"

    def __init__(self, url: str, device: torch.device, *, timeout_s: float = 10.0, request_timeout_s: float = 60.0,
                 **options: Any) -> None:
        self.url = parse_url(url)
        self.client_module = import_client(self.url.scheme)
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self._clients = threading.local()
        client = self._wait_ready()
        try:
            metadata = _as_dict(client.get_model_metadata(self.url.model, self.url.version))
            config = _as_dict(client.get_model_config(self.url.model, self.url.version))
        except Exception as e:
            raise EngineError(f"{self.url}: cannot read the model's metadata ({_message(e)})") from None
        signature, names = signature_from_server(metadata, config, self.url)
        super().__init__(signature, device, class_names=names, **options)
        # inputs leave through host memory whatever their device: the binder checks them on the CPU side;
        # ``device`` is where outputs are returned
        self.binder = Binder(signature, "cpu", cast=self.binder.cast, copy_to_device=True, check_values=self.binder.check_values)
        self.path = str(self.url)

    def _client(self) -> Any:
        c = getattr(self._clients, "client", None)
        if c is None:
            if self.url.scheme == "grpc":
                c = self.client_module.InferenceServerClient(self.url.address)
            else:
                c = self.client_module.InferenceServerClient(self.url.address, connection_timeout=self.request_timeout_s,
                                                             network_timeout=self.request_timeout_s)
            self._clients.client = c
        return c

    def _wait_ready(self) -> Any:
        """Bounded retry: the server may still be starting; a server that stays down is an error naming the URL."""
        deadline = time.monotonic() + self.timeout_s
        last = "no answer"
        while True:
            try:
                client = self._client()
                if client.is_model_ready(self.url.model, self.url.version):
                    return client
                last = "the server answers but the model is not ready"
                if not client.is_server_live():
                    last = "the server is not live"
            except Exception as e:
                last = _message(e)
                self._clients.client = None
            if time.monotonic() >= deadline:
                raise EngineError(f"{self.url}: not reachable or not ready after {self.timeout_s:g} s ({last})")
            time.sleep(0.25)

    def _run(self, bound: BoundInputs) -> dict[str, torch.Tensor]:
        c = self.client_module
        requests = []
        for spec in self.signature.inputs:
            array = bound.tensors[spec.name].detach().cpu().contiguous().numpy()
            item = c.InferInput(spec.name, list(array.shape), TRITON_DATATYPES[spec.dtype])
            if self.url.scheme == "http":
                item.set_data_from_numpy(array, binary_data=True)
            else:
                item.set_data_from_numpy(array)
            requests.append(item)
        wanted = [c.InferRequestedOutput(s.name, binary_data=True) if self.url.scheme == "http" else c.InferRequestedOutput(s.name)
                  for s in self.signature.outputs]
        try:
            if self.url.scheme == "grpc":
                result = self._client().infer(self.url.model, requests, model_version=self.url.version, outputs=wanted,
                                              client_timeout=self.request_timeout_s)
            else:
                result = self._client().infer(self.url.model, requests, model_version=self.url.version, outputs=wanted)
        except Exception as e:
            self._clients.client = None  # a broken connection is not reused
            raise EngineError(f"{self.url}: the server refused or failed the request ({_message(e)})") from None
        outputs = check_response(result, self.signature, bound.dims, self.url)
        return self._into_callers({k: v.to(self.device) for k, v in outputs.items()}, bound)

    def statistics(self) -> dict[str, Any]:
        """Triton's per-model statistics (``inference_count`` vs ``execution_count`` shows the batcher's merging)."""
        stats = _as_dict(self._client().get_inference_statistics(self.url.model, self.url.version))
        return next((m for m in stats.get("model_stats", []) if m.get("name") == self.url.model), {})

    def close(self) -> None:
        c = getattr(self._clients, "client", None)
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
            self._clients.client = None


def check_response(result: Any, signature: Signature, dims: dict[str, int], url: Any) -> dict[str, torch.Tensor]:
    """Every output present, of the declared datatype and implied shape, with exactly its bytes: else EngineError."""
    import numpy as np

    raw = None
    response = result.get_response()
    if not isinstance(response, dict):  # gRPC: the raw bytes of each output, in response order
        raw = {o.name: (o, response.raw_output_contents[i] if i < len(response.raw_output_contents) else b"")
               for i, o in enumerate(response.outputs)}
    out = {}
    for spec in signature.outputs:
        want_shape = resolve_shape(spec, dims)
        meta = result.get_output(spec.name)
        if meta is None:
            raise EngineError(f"{url}: the response has no output {spec.name}")
        meta = _as_dict(meta)
        datatype, shape = meta.get("datatype"), tuple(int(d) for d in meta.get("shape", []))
        if datatype != TRITON_DATATYPES[spec.dtype]:
            raise EngineError(f"{url}: output {spec.name} came back as {datatype}, the model declares {TRITON_DATATYPES[spec.dtype]}")
        if want_shape is not None and shape != want_shape:
            raise EngineError(f"{url}: output {spec.name} came back with shape {list(shape)}, expected {list(want_shape)}")
        expected = int(np.prod(shape)) * dtypes.get(spec.dtype).itemsize
        got = len(raw[spec.name][1]) if raw is not None else int(meta.get("parameters", {}).get("binary_data_size", -1))
        if got != expected:
            raise EngineError(f"{url}: output {spec.name} {list(shape)} came back with {got} bytes instead of {expected} "
                              "(empty contents: a python-backend model answering through numpy in a stub with numpy >= 2 does this; "
                              "pass outputs by DLPack, pb_utils.Tensor.from_dlpack, as rtdetr-deploy serve does)")
        array = result.as_numpy(spec.name)
        if array is None or tuple(array.shape) != shape:
            raise EngineError(f"{url}: output {spec.name} could not be decoded as {list(shape)}")
        out[spec.name] = torch.from_numpy(np.ascontiguousarray(array).copy())
    return out


def _message(e: BaseException) -> str:
    text = e.message() if callable(getattr(e, "message", None)) else str(e)
    return (text or type(e).__name__).strip().splitlines()[0][:300]


def load(source: Any, device: torch.device | None = None, **options: Any) -> TritonEngine:
    return TritonEngine(str(source), device or torch.device("cpu"), **options)
