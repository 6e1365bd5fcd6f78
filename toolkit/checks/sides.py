"""The two sides of a compare: an engine run over images, a saved ``detections.json``, or a reference directory
(saved inputs and outputs, replayed through the other engine).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..atomic import write_bytes, write_text
from ..errors import InputError
from ..runtime.base import BaseEngine
from ..runtime.detections import Detections, split_batch
from ..runtime.engine import load
from ..signature import INPUT_IMAGES, INPUT_SIZES

REFERENCE_FORMAT = "rtdetr-deploy/reference/1"


REFERENCE_META = "reference.json"


RESULTS_FILE = "detections.json"


@dataclass
class Side:
    """What one backend produced for the compared images, and what is known about it."""

    name: str
    keys: list[str]
    detections: list[Detections]
    class_names: list[str] = field(default_factory=list)
    sizes_wh: list[tuple[int, int]] | None = None
    sizes_dtype: str | None = None
    engine: BaseEngine | None = None
    inputs: dict[str, torch.Tensor] | None = None  # preprocessed inputs the engine saw
    paths: list[Path] | None = None  # image files, when known (drawing)
    selection_gap: float | None = None  # stored with a reference bundle
    random_weights: str | None = None  # how the side's weights were generated, when they are random (untrained)


def synthetic_images(directory: str | Path) -> list[Path]:
    """Four deterministic structured PNGs (two 320x240, two 240x320) from :func:`toolkit.export.verify.verification_images`."""
    from torchvision.io import write_png

    from ..export.verify import verification_images

    out = []
    for j, size in enumerate(((240, 320), (320, 240))):
        batch = (verification_images(2, size, seed=11 + j) * 255).round().to(torch.uint8)
        for i, image in enumerate(batch):
            path = Path(directory) / f"synthetic_{2 * j + i}.png"
            write_png(image, str(path))
            out.append(path)
    return out


def _run_engine(engine: BaseEngine, name: str, paths: list[Path], batch_size: int = 8) -> Side:
    from ..runtime.preprocessing import engine_preprocess, preprocess, read_image

    spec = engine_preprocess(engine)
    decoded = [read_image(p) for p in paths]
    images, sizes = preprocess(decoded, spec)
    side = _replay(engine, name, {INPUT_IMAGES: images, INPUT_SIZES: sizes}, [p.name for p in paths], batch_size)
    side.paths = paths
    return side


def _replay(engine: BaseEngine, name: str, inputs: dict[str, torch.Tensor], keys: list[str], batch_size: int = 8) -> Side:
    _, hi = engine.signature.bounds("N")
    step = min(batch_size, hi) if hi else batch_size
    dets: list[Detections] = []
    for i in range(0, len(keys), step):
        out = engine.infer({k: v[i:i + step].to(engine.device) for k, v in inputs.items()})
        dets += split_batch(out)
    sizes = inputs[INPUT_SIZES]
    return Side(name, keys, dets, engine.class_names, [tuple(map(int, s)) for s in sizes.tolist()],
                engine.signature.input(INPUT_SIZES).dtype, engine, inputs, random_weights=getattr(engine, "random_weights", None))


def _results_path(source: Any) -> Path | None:
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_file() and p.suffix == ".json":
            return p
        if p.is_dir() and (p / RESULTS_FILE).is_file():
            return p / RESULTS_FILE
    return None


def _reference_dir(source: Any) -> Path | None:
    if isinstance(source, (str, Path)) and (Path(source) / REFERENCE_META).is_file():
        return Path(source)
    return None


def _read_results(path: Path, name: str) -> Side:
    """A COCO results file from ``rtdetr-deploy run``, grouped per image (by file_name, else image_id)."""
    try:
        records = json.loads(path.read_text())
        per_image: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            per_image.setdefault(str(r.get("file_name", r["image_id"])), []).append(r)
        dets = {}
        for key, recs in per_image.items():
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in recs)], dtype=torch.float32)
            dets[key] = Detections(torch.tensor([int(r["category_id"]) for r in recs], dtype=torch.int64), boxes.reshape(-1, 4),
                                   torch.tensor([float(r["score"]) for r in recs], dtype=torch.float32))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: not a COCO results file written by 'rtdetr-deploy run' ({e.__class__.__name__}: {e})") from None
    keys = sorted(dets)
    return Side(name, keys, [dets[k] for k in keys])


def _read_reference(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / REFERENCE_META).read_text())
        inputs, outputs = load_file(str(directory / "inputs.safetensors")), load_file(str(directory / "outputs.safetensors"))
    except Exception as e:  # json, safetensors and OS errors alike
        raise InputError(f"{directory}: not a readable reference bundle ({e.__class__.__name__}: {e})") from None
    if meta.get("format") != REFERENCE_FORMAT:
        raise InputError(f"{directory}: reference format {meta.get('format')!r}, expected {REFERENCE_FORMAT!r}")
    return meta, inputs, outputs


def _reference_side(directory: Path, name: str) -> Side:
    meta, inputs, outputs = _read_reference(directory)
    keys = list(meta["images"])
    return Side(name, keys, split_batch(outputs), meta.get("class_names", []),
                [tuple(map(int, s)) for s in inputs[INPUT_SIZES].tolist()], meta.get("sizes_dtype"), None, inputs,
                selection_gap=meta.get("selection_gap"), random_weights=meta.get("random_weights"))


def save_reference(engine: BaseEngine, images: Sequence[str | Path] | None, directory: str | Path) -> Path:
    """Store a known-good engine's preprocessed inputs and outputs plus metadata in ``directory``.

    Files: ``inputs.safetensors`` (``images``, ``orig_target_sizes`` as given to the engine),
    ``outputs.safetensors`` (``labels``, ``boxes``, ``scores``), ``reference.json`` (format, backend,
    class_names, images, sizes_dtype, signature, selection_gap, toolkit_version). ``compare(directory, engine)``
    replays the inputs into another engine with the same verdict logic.
    """
    from ..runtime.preprocessing import list_images

    with tempfile.TemporaryDirectory() as tmp:
        paths = list_images(images) if images is not None else synthetic_images(tmp)
        side = _run_engine(engine, engine.backend, paths)
    return _write_reference(side, directory)


def _write_reference(side: Side, directory: str | Path) -> Path:
    from safetensors.torch import save

    from .. import __version__

    engine, inputs = side.engine, side.inputs
    if engine is None or inputs is None:
        raise InputError(f"{side.name}: a reference bundle needs an engine and the inputs it ran on")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    outputs = {k: torch.stack([getattr(d, attr) for d in side.detections]).contiguous()
               for k, attr in (("labels", "labels"), ("boxes", "boxes_xyxy"), ("scores", "scores"))}
    meta = {"format": REFERENCE_FORMAT, "backend": engine.backend, "device": str(engine.device), "class_names": engine.class_names,
            "images": side.keys, "sizes_dtype": side.sizes_dtype, "signature": engine.signature.to_dict(),
            "selection_gap": selection_gap(engine, inputs), "toolkit_version": __version__,
            "random_weights": getattr(engine, "random_weights", None)}
    write_bytes(out / "inputs.safetensors", save({k: v.contiguous().cpu() for k, v in inputs.items()}))
    write_bytes(out / "outputs.safetensors", save(outputs))
    write_text(out / REFERENCE_META, json.dumps(meta, indent=2) + "\n")
    return out


def selection_gap(engine: BaseEngine, inputs: dict[str, torch.Tensor]) -> float | None:
    """Smallest gap, over images, at the top-K boundary of the encoder's query selection; None when not reachable.

    Reachable for eager torch models with an ``enc_score_head`` and for ONNX files whose selection TopK is
    found (see :mod:`toolkit.export.verify`). A gap below ``TIE_GAP`` means two correct backends may pick different
    queries, so their outputs cannot be judged against each other.
    """
    from ..export.verify import _selection_node_output, _torch_selection_scores

    images, sizes = inputs[INPUT_IMAGES], inputs[INPUT_SIZES]
    model = getattr(engine, "model", None)
    path = getattr(engine, "path", None)
    if model is not None and hasattr(model, "model"):
        num_queries = getattr(getattr(model.model, "config", None), "num_queries", None)
        _, scores = _torch_selection_scores(model, images.to(engine.device), sizes.to(engine.device))
    elif path is not None and Path(path).suffix == ".onnx":
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper

        graph = onnx.load(str(path))
        name = _selection_node_output(graph)
        topk = next((n for n in graph.graph.node if n.op_type == "TopK" and name is not None and n.input[0] == name), None)
        consts = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
        consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
        if topk is None or topk.input[1] not in consts:
            return None
        num_queries = int(consts[topk.input[1]].reshape(-1)[0])
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {INPUT_IMAGES: images.cpu().numpy(), INPUT_SIZES: sizes.cpu().to(torch.int64).numpy()}
        want = engine.signature.input(INPUT_SIZES).dtype
        feeds[INPUT_SIZES] = feeds[INPUT_SIZES].astype(want)
        scores = torch.from_numpy(session.run([name], feeds)[0])
    else:
        return None
    if scores is None or not num_queries or scores.shape[1] <= num_queries:
        return None
    ordered = scores.float().sort(dim=1, descending=True).values
    return float((ordered[:, num_queries - 1] - ordered[:, num_queries]).min())


def _open(source: Any, backend: str | None, device: str | None, label: str) -> tuple[str, Any]:
    """(kind, value): ``engine`` (a BaseEngine), ``results`` (a Path) or ``reference`` (a directory)."""
    if isinstance(source, BaseEngine):
        return "engine", source
    if (ref := _reference_dir(source)) is not None:
        return "reference", ref
    if (res := _results_path(source)) is not None:
        return "results", res
    if isinstance(source, (str, Path)) and Path(source).suffix == ".json" and not Path(source).exists():
        raise InputError(f"{label}: {source}: no such file")
    return "engine", load(source, backend=backend, device=device)


def _side_name(kind: str, value: Any) -> str:
    if kind == "engine":
        return value.backend
    if kind == "reference":
        return f"reference {value.name}"
    return f"results {value.parent.name}/{value.name}"


def _align(a: Side, b: Side) -> tuple[Side, Side]:
    common = [k for k in a.keys if k in set(b.keys)]
    if not common:
        raise InputError(f"{a.name} and {b.name} share no image: {', '.join(a.keys[:3])} vs {', '.join(b.keys[:3])}")

    def pick(s: Side) -> Side:
        idx = [s.keys.index(k) for k in common]
        return Side(s.name, common, [s.detections[i] for i in idx], s.class_names,
                    [s.sizes_wh[i] for i in idx] if s.sizes_wh else None, s.sizes_dtype, s.engine, s.inputs,
                    [s.paths[i] for i in idx] if s.paths else None, s.selection_gap, s.random_weights)
    return pick(a), pick(b)


def _build_sides(a: Any, b: Any, images: Sequence[str | Path] | None, tmp: str, backends: tuple[str | None, str | None],
                 devices: tuple[str | None, str | None]) -> tuple[Side, Side]:
    from ..runtime.preprocessing import list_images, read_image

    opened = [_open(s, bk, dv, label) for s, bk, dv, label in zip((a, b), backends, devices, ("A", "B"))]
    names = [_side_name(k, v) for k, v in opened]
    if names[0] == names[1]:
        names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    refs = [v for k, v in opened if k == "reference"]
    paths = list_images(images) if images is not None else None
    sides: list[Side | None] = [None, None]
    for i, (kind, value) in enumerate(opened):
        if kind == "reference":
            sides[i] = _reference_side(value, names[i])
        elif kind == "results":
            sides[i] = _read_results(value, names[i])
    for i, (kind, value) in enumerate(opened):
        if kind != "engine":
            continue
        if refs:
            ref = sides[1 - i]
            sides[i] = _replay(value, names[i], ref.inputs, ref.keys)
        else:
            if paths is None and any(k == "results" for k, _ in opened):
                raise InputError("comparing an engine with a result file needs the images the results were made from (--images)")
            sides[i] = _run_engine(value, names[i], paths if paths is not None else synthetic_images(tmp))
    a_side, b_side = _align(sides[0], sides[1])
    if paths is not None:  # result files: sizes and drawings come from the image files
        by_name = {p.name: p for p in paths}
        for s in (a_side, b_side):
            if s.paths is None and all(k in by_name for k in s.keys):
                s.paths = [by_name[k] for k in s.keys]
                if s.sizes_wh is None:
                    s.sizes_wh = [(int(im.shape[-1]), int(im.shape[-2])) for im in map(read_image, s.paths)]
    return a_side, b_side
