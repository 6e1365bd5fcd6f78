"""Export a model behind the deploy contract to a verified ONNX file.

The file is written atomically, checked by ``onnx.checker``, carries its metadata (toolkit version,
config, input size, class names, preprocessing, contract version) and is verified in ONNX Runtime
against torch before the call returns (see :mod:`toolkit.export.verify`).
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_path, check_output_path
from ..errors import ExportError
from ..integrity import ONNX_KEY, ONNX_PLACEHOLDER, seal_onnx
from ..models.contract import PRECISIONS, DeployModel, ReducedPrecision
from ..models.families import trace_patches
from ..models.fold import FoldError, FoldReport, fold_model
from ..models.loading import load_model
from ..models.weights import weights_sha256
from ..progress import Steps
from ..signature import (
    CONTRACT_VERSION,
    INPUT_IMAGES,
    INPUT_SIZES,
    OUTPUTS,
    Signature,
    from_onnx,
)
from .verify import VerifyReport, verify_onnx

DEFAULT_OPSET = 17


@dataclass
class ExportResult:
    path: Path
    signature: Signature
    verify: VerifyReport | None
    lints: list[str] = field(default_factory=list)
    seconds: float = 0.0
    islands: Any = None  # toolkit.export.islands.IslandReport for fp16 exports with auto_islands
    fold: FoldReport | None = None  # what was folded into the exported graph (None: fold=False)


def _resize_model(model: DeployModel, size: tuple[int, int]) -> DeployModel:
    """A copy at another input size (never the caller's model: it may be in use elsewhere); transformers RT-DETR
    precomputes its anchors for one size, so regenerate them."""
    model = copy.deepcopy(model)
    model.preprocess = replace(model.preprocess, size=size)
    inner = getattr(model.model, "model", None)
    if inner is not None and hasattr(inner, "generate_anchors") and getattr(inner.config, "anchor_image_size", None):
        inner.config.anchor_image_size = list(size)
        inner.anchors, inner.valid_mask = inner.generate_anchors(dtype=torch.float32)
    return model


def _source_metadata(model: Any, config: str | None) -> dict[str, str]:
    """Where the model came from, so that builders that compile the torch model (AOTInductor) can start from
    the ONNX file: a checkpoint path or a config name; nothing for an in-memory module."""
    if isinstance(model, (str, Path)):
        path = Path(model)
        source = str(path.resolve()) if path.exists() else str(model)
        return {"source": source, **({"source_config": str(config)} if config is not None else {})}
    if model is None and config is not None:  # a config's generated weights: deterministic, rebuilt from the name
        path = Path(str(config))
        return {"source_config": str(path.resolve()) if path.is_file() else str(config)}
    return {}


def lint(onnx_model: Any, signature: Signature) -> list[str]:
    """What users trip over when they take this file to TensorRT."""
    notes = []
    for spec in signature.inputs:
        if spec.dtype == "int64":
            notes.append(f"input {spec.name} is int64: TensorRT 10/11 keep it, TensorRT 8 narrows it to int32 and a torch "
                         "int64 tensor bound there reads [[640,640]] as [[640,0]] (every y coordinate 0); "
                         "toolkit.load() converts or refuses such tensors, raw pointer binding does not")
    ops = [n.op_type for n in onnx_model.graph.node]
    if "GridSample" in ops:
        notes.append(f"{ops.count('GridSample')} GridSample node(s): results and support vary across TensorRT versions; "
                     "compare each engine with ONNX Runtime")
    opset = next((o.version for o in onnx_model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < 17 and ops.count("ReduceMean") >= 2:
        notes.append(f"opset {opset} < 17: LayerNorm is split into primitive ops, which overflow in fp16; export with --opset 17")
    return notes


def _first_non_finite_weight(model: torch.nn.Module) -> str | None:
    """The first floating-point parameter or buffer of ``model`` holding NaN/Inf, as "parameter 'name'"; None if all are finite."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not torch.isfinite(t).all():
                return f"{kind} {name!r}"
    return None


def export_onnx(
    model: Any = None,
    output: str | Path = "model.onnx",
    *,
    config: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    size: tuple[int, int] | None = None,
    sizes_dtype: str = "int64",
    simplify: bool = False,
    verify: bool = True,
    precision: str = "fp32",
    progress: bool = False,
    auto_islands: bool = True,
    fold: bool = True,
) -> ExportResult:
    """Export ``model`` (anything :func:`toolkit.models.loading.load_model` accepts) to a verified ONNX file at ``output``.

    ``precision="fp16"`` (or ``"bf16"``) exports the network body in half precision while the I/O, the
    sigmoid, top-K and box scaling stay fp32: reduced precision as a property of the graph, which is what
    strongly typed builders (TensorRT 11, TensorRT-RTX) need, and what ONNX Runtime CUDA runs as is.
    ``progress``: a line on stderr per step (load, trace, check, verify) with its elapsed time.
    With ``auto_islands`` (default) the nodes whose fp16 outputs overflow on the verification images are kept in
    fp32 (:mod:`toolkit.export.islands`); they are listed in ``result.islands`` and the ``fp16_islands`` metadata.

    ``fold`` (default): export a copy with every BatchNorm folded into its convolution and the position embedding
    precomputed (:func:`toolkit.models.fold.fold_model`, proved equal to the model in fp32 first); the ONNX
    verification then compares the folded file against the *unfolded* torch model. The metadata key ``fold``
    records what was folded (``off`` without).
    """
    import onnx

    start = time.perf_counter()
    output = check_output_path(output)
    if sizes_dtype not in ("int64", "int32"):
        raise ExportError(f"sizes_dtype must be int64 or int32, got {sizes_dtype!r}")
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"ONNX precision must be fp32 or fp16, got {precision!r} (torch's ONNX exporter cannot "
                          "trace a bfloat16 body; for bf16 use the AOTInductor build: rtdetr-deploy build --backend aoti)")
    steps = Steps("export", enabled=progress)
    with steps.step("loading the model"):
        deploy = load_model(model, config=config).eval()
    if size is not None:
        deploy = _resize_model(deploy, tuple(size))
    device = next(deploy.parameters()).device
    h, w = deploy.preprocess.size
    sdtype = getattr(torch, sizes_dtype)
    images = torch.rand(2, 3, h, w, device=device)
    sizes = torch.tensor([[w, h], [w // 2, h // 2]], dtype=sdtype, device=device)
    axes = {n: {0: "N"} for n in (INPUT_IMAGES, INPUT_SIZES, *OUTPUTS)} if dynamic_batch else None
    fold_report = None
    body = deploy
    fold_notes: list[str] = []
    bad = _first_non_finite_weight(deploy) if fold else None
    if bad is not None:  # the fold cannot be proved on such weights, and its error would hide the tensor at fault:
        fold_notes.append(f"not folded: the model's {bad} holds NaN/Inf (the verification names the graph's first "
                          "non-finite tensor)")  # export the model as it is and let the verification say so
    elif fold:
        try:
            body, fold_report = fold_model(deploy)
        except FoldError as e:
            raise ExportError(f"folding the model for export failed: {e}") from None
    traced = body if precision == "fp32" else ReducedPrecision(copy.deepcopy(body), PRECISIONS[precision]).eval()
    with atomic_path(output) as tmp:
        try:
            with steps.step(f"tracing with torch.onnx.export (opset {opset})"), warnings.catch_warnings(), \
                    torch.inference_mode(False), torch.no_grad(), trace_patches(traced, (h, w)):
                warnings.simplefilter("ignore")
                torch.onnx.export(traced, (images, sizes), str(tmp), input_names=[INPUT_IMAGES, INPUT_SIZES],
                                  output_names=list(OUTPUTS), opset_version=opset, dynamic_axes=axes, dynamo=False)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed at opset {opset}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
        onnx_model = onnx.load(str(tmp))
        _name_output_dims(onnx_model, deploy.top_k if not deploy.contract else None)
        islands = None
        if precision != "fp32":
            _grid_sample_in_fp32(onnx_model)
            if auto_islands:
                islands = _auto_islands(onnx_model, (h, w), sizes_dtype)
        if simplify:
            onnx_model = _simplify(onnx_model)
        signature = replace(from_onnx(onnx_model), preprocess=deploy.preprocess)
        meta = {
            "toolkit_version": __version__, "contract_version": CONTRACT_VERSION, "config_name": deploy.name,
            "input_size": json.dumps(list(deploy.preprocess.size)), "class_names": json.dumps(deploy.class_names),
            "preprocess": json.dumps(_preprocess_dict(deploy)), "top_k": str(deploy.top_k), "sizes_dtype": sizes_dtype,
            "precision": precision, "weights_sha256": weights_sha256(deploy), **_source_metadata(model, config),
            "fold": json.dumps(fold_report.to_dict()) if fold_report is not None else "off",
            ONNX_KEY: ONNX_PLACEHOLDER,  # sealed below with the file's size and sha256
        }
        generated = getattr(deploy, "random_weights", None)
        if generated:  # generated, untrained weights: say so in every artifact
            meta["random_weights"] = generated
        if islands is not None:
            meta["fp16_islands"] = json.dumps(islands.nodes)
        del onnx_model.metadata_props[:]
        for k, v in meta.items():
            onnx_model.metadata_props.add(key=k, value=v)
        try:
            onnx.checker.check_model(onnx_model, full_check=True)
        except Exception as e:
            raise ExportError(f"onnx.checker rejected the exported graph: {e}") from None
        onnx.save(onnx_model, str(tmp))
        seal_onnx(tmp)
        report = None
        if verify:
            with steps.step("verifying the file against torch in ONNX Runtime"):
                report = verify_onnx(tmp, deploy, sizes_dtype=sdtype, batches=(2, 3) if dynamic_batch else (2,), precision=precision)
            if report.verdict == "disagree":  # inconclusive (tied selection) is written, and says so
                raise ExportError(f"the exported file does not match torch; nothing was written to {output}\n{report.summary()}")
    notes = fold_notes + lint(onnx_model, signature) + ([islands.summary()] if islands is not None and islands.nodes else [])
    load_report = getattr(deploy, "load_report", None)  # an official checkpoint: decoder layers past eval_idx are dropped
    notes += [load_report.dropped_note()] if getattr(load_report, "dropped", None) else []
    return ExportResult(output, signature, report, notes, time.perf_counter() - start, islands=islands, fold=fold_report)


def _auto_islands(onnx_model: Any, size: tuple[int, int], sizes_dtype: str) -> Any:
    """fp32 islands where fp16 overflows on the structured verification images (see toolkit.export.islands)."""
    import numpy as np

    from .islands import auto_islands
    from .verify import verification_images

    images = verification_images(4, size, seed=11).numpy()
    sizes = np.array([[size[1], size[0]]] * 4, dtype=sizes_dtype)
    return auto_islands(onnx_model, [{INPUT_IMAGES: images[:2], INPUT_SIZES: sizes[:2]}, {INPUT_IMAGES: images[2:], INPUT_SIZES: sizes[2:]}])


def _preprocess_dict(model: DeployModel) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(model.preprocess)


def _grid_sample_in_fp32(onnx_model: Any) -> int:
    """Run every half-precision GridSample in fp32 (Cast in, Cast out); returns how many were wrapped.

    ONNX Runtime's CUDA GridSample kernel is registered for float only, so an fp16 GridSample is placed on the
    CPU: on the H100 the fp16 RT-DETR-R50 spent 54 ms per batch-32 call in host-to-device copies and ran slower
    than fp32 (docs/benchmarks.md). The deformable attention's sampling also keeps more precision in fp32.
    """
    import onnx
    from onnx import TensorProto, helper

    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(onnx_model).graph.value_info}
    nodes, wrapped = [], 0
    for node in onnx_model.graph.node:
        if node.op_type != "GridSample" or types.get(node.input[0]) != TensorProto.FLOAT16:
            nodes.append(node)
            continue
        wrapped += 1
        casts_in = [helper.make_node("Cast", [name], [f"{name}__fp32_{wrapped}"], to=TensorProto.FLOAT, name=f"{node.name}/cast_in{i}")
                    for i, name in enumerate(node.input[:2])]
        out = node.output[0]
        node.input[0], node.input[1] = casts_in[0].output[0], casts_in[1].output[0]
        node.output[0] = f"{out}__fp32"
        nodes += [*casts_in, node, helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT16, name=f"{node.name}/cast_out")]
    del onnx_model.graph.node[:]
    onnx_model.graph.node.extend(nodes)
    return wrapped


def _name_output_dims(onnx_model: Any, top_k: int | None) -> None:
    """Give the exporter's generated output dim names (``Modlabels_dim_1``...) the fixed top-K they are."""
    for out in onnx_model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_param") and top_k is not None:
            dims[1].dim_value = top_k


def _simplify(onnx_model: Any) -> Any:
    try:
        import onnxslim
    except ImportError:
        raise ExportError("--simplify needs onnxslim: pip install 'rtdetr-deploy[simplify]'") from None
    return onnxslim.slim(onnx_model)
