"""The typed I/O signature that export, build, run and compare all share.

A :class:`Signature` is the single source of truth about an engine: tensor names, dtypes and shapes
(symbolic dims such as ``"N"`` for the dynamic batch), the bounds of those dims (an engine's
optimization profile), and how images must be preprocessed for it. It is read back from the artifact
itself (ONNX graph, engine, sidecar), never assumed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable

from . import dtypes

Dim = int | str
CONTRACT_VERSION = "1"
INPUT_IMAGES = "images"
INPUT_SIZES = "orig_target_sizes"
OUTPUTS = ("labels", "boxes", "scores")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: name, canonical dtype name (see :mod:`toolkit.dtypes`) and shape (int or symbol)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtypes.get(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(d) if isinstance(d, int) else str(d) for d in self.shape))

    def describe(self) -> str:
        """``int32 [N,2]``: the form used in every message and table."""
        return f"{self.dtype} [{','.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class PreprocessSpec:
    """How images become the ``images`` input; stored with the model so every backend sees the same input.

    ``sizes_order`` is the order of ``orig_target_sizes`` columns: ``"wh"`` as the official RT-DETR
    postprocessor expects (transformers' ``target_sizes`` are ``"hw"``; the contract is ``"wh"``).
    """

    size: tuple[int, int] = (640, 640)  # (height, width) of the network input
    resize: str = "stretch"  # or "letterbox" (aspect kept, padded centrally with ``pad_value``)
    value_range: tuple[float, float] = (0.0, 1.0)
    channel_order: str = "RGB"
    sizes_order: str = "wh"
    pad_value: float = 0.447  # 114/255, the letterbox grey
    # (mean, std) per channel that the model applies itself (DINOv3 backbones): feed images in value_range as
    # they are, never normalized. None: the network takes value_range input directly.
    in_model_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "value_range", tuple(float(v) for v in self.value_range))
        if self.in_model_normalization is not None:
            mean, std = (tuple(float(v) for v in part) for part in self.in_model_normalization)
            object.__setattr__(self, "in_model_normalization", (mean, std))
        if self.resize not in ("stretch", "letterbox"):
            raise ValueError(f"resize must be 'stretch' or 'letterbox', got {self.resize!r}")
        if self.sizes_order != "wh":
            raise ValueError("the deploy contract's orig_target_sizes are (w, h): sizes_order must be 'wh'")


@dataclass(frozen=True)
class Signature:
    """Inputs and outputs of an engine, the bounds of its symbolic dims, and its preprocessing."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_bounds: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # symbol -> (min, max or None)
    preprocess: PreprocessSpec | None = None

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, "input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, "output")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def bounds(self, symbol: str) -> tuple[int, int | None]:
        return self.dim_bounds.get(symbol, (0, None))

    def fixed_batch_outputs(self) -> tuple[str | None, list[TensorSpec]]:
        """(the inputs' symbolic batch dim, outputs whose batch dim is a fixed number): a file whose inputs take any
        batch but whose outputs are declared ``[1,300]`` (torch.onnx's dynamo exporter does this) runs only at that batch."""
        symbols = {t.shape[0] for t in self.inputs if t.shape and isinstance(t.shape[0], str) and t.shape[0] != "?"}
        if len(symbols) != 1:
            return None, []
        return next(iter(symbols)), [t for t in self.outputs if t.shape and isinstance(t.shape[0], int) and t.shape[0] >= 0]

    def batch_warning(self) -> str | None:
        """One line when :meth:`fixed_batch_outputs` finds any, else None."""
        symbol, fixed = self.fixed_batch_outputs()
        if not fixed:
            return None
        return (f"outputs {_shapes(fixed)} declare a fixed batch while the inputs' batch {symbol} is dynamic: the graph "
                "probably runs only at that batch (torch.onnx's dynamo exporter bakes it in). Run it at that batch, or "
                "re-export with dynamic output axes (rtdetr-deploy export does).")

    def with_bounds(self, **bounds: tuple[int, int | None]) -> "Signature":
        return replace(self, dim_bounds={**self.dim_bounds, **bounds})

    def is_deploy_contract(self) -> bool:
        return set(self.input_names) == {INPUT_IMAGES, INPUT_SIZES} and set(OUTPUTS) <= set(self.output_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [_spec_dict(t) for t in self.inputs],
            "outputs": [_spec_dict(t) for t in self.outputs],
            "dim_bounds": {k: list(v) for k, v in self.dim_bounds.items()},
            "preprocess": asdict(self.preprocess) if self.preprocess else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Signature":
        pre = data.get("preprocess")
        return cls(
            inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
            outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
            dim_bounds={k: (int(v[0]), None if v[1] is None else int(v[1])) for k, v in data.get("dim_bounds", {}).items()},
            preprocess=PreprocessSpec(**pre) if pre else None,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Signature":
        return cls.from_dict(json.loads(text))

    def rows(self) -> Iterable[tuple[str, str, str, str]]:
        """(direction, name, dtype, shape) rows for tables."""
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            for t in specs:
                yield kind, t.name, t.dtype, "[" + ",".join(str(d) for d in t.shape) + "]"


def _shapes(specs: Iterable[TensorSpec]) -> str:
    return ", ".join(f"{t.name} [{','.join(map(str, t.shape))}]" for t in specs)


def _spec_dict(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def _find(specs: tuple[TensorSpec, ...], name: str, kind: str) -> TensorSpec:
    for t in specs:
        if t.name == name:
            return t
    raise KeyError(f"no {kind} named {name!r}; {kind}s: {', '.join(t.name for t in specs)}")


def deploy_signature(
    preprocess: PreprocessSpec, sizes_dtype: str = "int64", top_k: int = 300, batch: Dim = "N"
) -> Signature:
    """The signature of the RT-DETR deploy contract for a given input size, sizes dtype and top-K."""
    h, w = preprocess.size
    return Signature(
        inputs=(TensorSpec(INPUT_IMAGES, "float32", (batch, 3, h, w)), TensorSpec(INPUT_SIZES, sizes_dtype, (batch, 2))),
        outputs=(
            TensorSpec("labels", "int64", (batch, top_k)),
            TensorSpec("boxes", "float32", (batch, top_k, 4)),
            TensorSpec("scores", "float32", (batch, top_k)),
        ),
        dim_bounds={batch: (1, None)} if isinstance(batch, str) else {},
        preprocess=preprocess,
    )


def from_onnx(path_or_model: Any) -> Signature:
    """Read the signature of an ONNX file from the graph itself (dtypes/shapes) and its metadata (rest)."""
    import onnx

    model = onnx.load(str(path_or_model), load_external_data=False) if not isinstance(path_or_model, onnx.ModelProto) else path_or_model
    initializers = {i.name for i in model.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        tt = v.type.tensor_type
        shape = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?") for d in tt.shape.dim)
        return TensorSpec(v.name, dtypes.from_onnx(tt.elem_type).name, shape)

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in model.graph.output)
    meta = {p.key: p.value for p in model.metadata_props}
    preprocess = _preprocess_metadata(meta["preprocess"]) if "preprocess" in meta else None
    symbols = {d for t in inputs + outputs for d in t.shape if isinstance(d, str)}
    bounds = {s: (1, None) for s in symbols}
    return Signature(inputs, outputs, bounds, preprocess)


def _preprocess_metadata(text: str) -> PreprocessSpec:
    """The ``preprocess`` metadata entry, or a :class:`~toolkit.errors.SignatureError` that says what is wrong with it."""
    from .errors import SignatureError

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SignatureError(f"metadata preprocess is not valid JSON ({e}); re-export the file") from None
    if not isinstance(data, dict):
        raise SignatureError(f"metadata preprocess must be a JSON object, got {text[:60]!r}; re-export the file")
    try:
        return PreprocessSpec(**data)
    except (TypeError, ValueError) as e:
        raise SignatureError(f"metadata preprocess does not describe a preprocessing ({e}); re-export the file") from None
