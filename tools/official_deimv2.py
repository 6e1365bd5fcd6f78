"""Run the OFFICIAL Intellindust-AI-Lab/DEIMv2 model code: write its state-dict manifests and record its deploy
outputs on seeded synthetic weights, as test data for ``tests/test_official_deimv2.py``.

Not part of CI (it needs the official repository); CI reads what this writes:

* ``tests/data/official_deimv2/VARIANT.json``: the official model's state-dict names, shapes and dtypes (the
  model built by the official ``YAMLConfig`` from the variant's YAML, HGNetV2 ``pretrained: False``, DINOv3
  ``weights_path: None``: no pretrained backbone is read);
* ``tests/data/official_deimv2/VARIANT_outputs.json`` (``--record``): what the official model computes in deploy
  mode (``model.deploy()`` + ``postprocessor.deploy()``, as the official ``tools/deployment/export_onnx.py``) on
  ``tests.official_deimv2_data.synthetic_state(VARIANT, seed)`` and ``parity_image()``; for the DINOv3 variants
  (S..X) the image ImageNet-normalized first (``tests.official_deimv2_data.normalized``), as the official
  inference (``tools/inference/torch_inf.py``) does for a ViT backbone.

    git --git-dir=<mirror of Intellindust-AI-Lab/DEIMv2> archive HEAD | tar -x -C /tmp/deimv2_official
    git --git-dir=<mirror> rev-parse HEAD > /tmp/deimv2_official/COMMIT
    PYTHONPATH=$PWD python tools/official_deimv2.py --official /tmp/deimv2_official [--record deimv2_atto deimv2_s]

The official package imports training-only dependencies at import time (tensorboard, torchvision's datasets
and transforms, the data pipeline) that the toolkit's environment lacks. The model never uses them, so the
script registers empty stand-ins for them, plus torchvision's two box helpers the official code calls
(``ops.box_convert`` cxcywh->xyxy in the postprocessor, ``ops.boxes.box_area`` in the loss), written out from
their definitions. Nothing of the official code is copied into the toolkit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "official_deimv2"

# toolkit config -> official YAML (configs/deimv2/...)
VARIANTS = {
    "deimv2_atto": "deimv2_hgnetv2_atto_coco.yml",
    "deimv2_femto": "deimv2_hgnetv2_femto_coco.yml",
    "deimv2_pico": "deimv2_hgnetv2_pico_coco.yml",
    "deimv2_n": "deimv2_hgnetv2_n_coco.yml",
    "deimv2_s": "deimv2_dinov3_s_coco.yml",
    "deimv2_m": "deimv2_dinov3_m_coco.yml",
    "deimv2_l": "deimv2_dinov3_l_coco.yml",
    "deimv2_x": "deimv2_dinov3_x_coco.yml",
}
MIN_GAP = 1e-3  # the encoder's selection scores at the top-K boundary must differ by this much (fp32 noise ~1e-6)


def _stand_ins(official: Path):
    import torch

    def box_convert(boxes, in_fmt, out_fmt):
        if (in_fmt, out_fmt) != ("cxcywh", "xyxy"):
            raise NotImplementedError(f"{in_fmt}->{out_fmt}")
        cx, cy, w, h = boxes.unbind(-1)
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)

    def box_area(boxes):
        return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    mods = {name: types.ModuleType(name) for name in ("torch.utils.tensorboard", "torchvision", "torchvision.ops", "torchvision.ops.boxes",
                                                      "torchvision.models", "torchvision.models.feature_extraction", "engine", "engine.data",
                                                      "engine.misc")}
    mods["torch.utils.tensorboard"].SummaryWriter = object
    mods["torchvision"].ops, mods["torchvision"].models = mods["torchvision.ops"], mods["torchvision.models"]
    mods["torchvision.ops"].box_convert, mods["torchvision.ops"].boxes = box_convert, mods["torchvision.ops.boxes"]
    mods["torchvision.ops.boxes"].box_area = box_area
    mods["torchvision.models"].feature_extraction = mods["torchvision.models.feature_extraction"]
    mods["torchvision.models.feature_extraction"].get_graph_node_names = None
    mods["torchvision.models.feature_extraction"].create_feature_extractor = None
    # the package, its data pipeline and its misc helpers (visualizer, logger) without their import-time side effects
    mods["engine"].__path__ = [str(official / "engine")]
    mods["engine.data"].__path__ = []
    mods["engine.data"].DataLoader = torch.utils.data.DataLoader
    mods["engine.misc"].__path__ = [str(official / "engine" / "misc")]
    sys.modules.update(mods)
    import engine.backbone  # noqa: F401  (registers the official modules)
    import engine.core
    import engine.deim  # noqa: F401

    return engine.core.YAMLConfig


def _commit(official: Path) -> str:
    stamp = official / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def _official(YAMLConfig, official: Path, yaml: str):
    cfg = YAMLConfig(str(official / "configs" / "deimv2" / yaml))
    if "HGNetv2" in cfg.yaml_cfg:
        cfg.yaml_cfg["HGNetv2"]["pretrained"] = False  # as the official export_onnx.py: no download
    if "DINOv3STAs" in cfg.yaml_cfg:
        cfg.yaml_cfg["DINOv3STAs"]["weights_path"] = None  # no pretrained ViT read (synthetic weights replace it)
    return cfg


def _dinov3(cfg) -> bool:
    return cfg.yaml_cfg.get("DEIM", {}).get("backbone") == "DINOv3STAs"


def _selection_gap(model, image, num_queries: int) -> float:
    import torch

    captured = {}
    handle = model.decoder.enc_score_head.register_forward_hook(lambda _m, _i, out: captured.__setitem__("s", out))
    with torch.no_grad():
        model(image)
    handle.remove()
    ordered = captured["s"].max(-1).values.sort(dim=1, descending=True).values
    return float((ordered[:, num_queries - 1] - ordered[:, num_queries]).min())


def write_manifest(YAMLConfig, official: Path, variant: str) -> Path:
    yaml = VARIANTS[variant]
    cfg = _official(YAMLConfig, official, yaml)
    model = cfg.model
    params = {k for k, _ in model.named_parameters()}
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "parameter": k in params}
               for k, v in model.state_dict().items()}
    setting = "DINOv3STAs weights_path=None" if _dinov3(cfg) else "HGNetv2 pretrained=False"
    record = {"source": f"Intellindust-AI-Lab/DEIMv2@{_commit(official)} configs/deimv2/{yaml}: the state_dict() of the model built "
              f"by the official YAMLConfig ({setting}); names, shapes and dtypes only", "tensors": tensors}
    path = OUT / f"{variant}.json"
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    return path


def record_outputs(YAMLConfig, official: Path, variant: str, seed: int, orig_size: list[int]) -> Path:
    import torch

    from tests.official_deimv2_data import normalized, parity_image, synthetic_state

    yaml = VARIANTS[variant]
    cfg = _official(YAMLConfig, official, yaml)
    model, post = cfg.model, cfg.postprocessor
    size = cfg.yaml_cfg["eval_spatial_size"]
    image = parity_image(size[0])
    image_desc = f"parity_image({size[0]})"
    if _dinov3(cfg):
        image = normalized(image)  # the official inference normalizes for a ViT backbone; the model itself does not
        image_desc = f"normalized({image_desc})"
    num_queries = cfg.yaml_cfg["DEIMTransformer"]["num_queries"]
    fresh = _official(YAMLConfig, official, yaml).model
    for attempt in range(20):
        state = synthetic_state(variant, seed + attempt)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SystemExit(f"{variant}: the synthetic state does not fit the official model: {missing[:3]} {unexpected[:3]}")
        # the official model's own anchors and valid mask (its buffers, computed for eval_spatial_size), not synthetic ones
        model.decoder.anchors.copy_(fresh.decoder.anchors)
        model.decoder.valid_mask.copy_(fresh.decoder.valid_mask)
        model.eval()
        gap = _selection_gap(model, image, num_queries)
        if gap >= MIN_GAP:
            break
        print(f"{variant}: seed {seed + attempt}: selection gap {gap:.2e} < {MIN_GAP}, next seed", flush=True)
    else:
        raise SystemExit(f"{variant}: no tie-free seed")
    used_seed = seed + attempt
    deploy, post = model.deploy(), post.deploy()
    with torch.no_grad():
        raw = deploy(image)
        labels, boxes, scores = post(raw, torch.tensor([orig_size]))
    record = {
        "source": f"Intellindust-AI-Lab/DEIMv2@{_commit(official)}: DEIM(...).deploy() and PostProcessor(...).deploy() of "
                  f"configs/deimv2/{yaml}, weights tests.official_deimv2_data.synthetic_state({variant!r}, seed={used_seed}) but the "
                  f"model's own anchors, image {image_desc}, orig_target_sizes [{orig_size}]",
        "input_normalized": _dinov3(cfg),
        "seed": used_seed, "input_size": size, "orig_target_sizes": [orig_size], "selection_gap": gap, "min_gap": MIN_GAP,
        "produced": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                     "date": datetime.date.today().isoformat(), "command": f"python tools/official_deimv2.py --record {variant}"},
        "labels": labels[0].tolist(), "boxes": [[round(v, 5) for v in b] for b in boxes[0].tolist()],
        "scores": [round(v, 8) for v in scores[0].tolist()],
        "pred_logits_first": raw["pred_logits"][0, :5, :5].tolist(), "pred_boxes_first": raw["pred_boxes"][0, :5].tolist(),
    }
    path = OUT / f"{variant}_outputs.json"
    path.write_text(json.dumps(record) + "\n")
    print(f"{variant}: seed {used_seed}, selection gap {gap:.3g} -> {path.name}", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="an exported tree of Intellindust-AI-Lab/DEIMv2 (with a COMMIT file)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="manifests to write")
    ap.add_argument("--record", nargs="*", default=[], choices=list(VARIANTS), help="variants whose outputs to record")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is None:
        # one process per variant: the official registry keeps the arguments of the last model it built (``create``
        # updates its schema in place), so Atto's use_gateway=False would otherwise leak into the next variant
        for variant in dict.fromkeys([*args.variants, *args.record]):
            cmd = [sys.executable, __file__, "--official", str(args.official), "--seed", str(args.seed), "--threads", str(args.threads),
                   "--one", variant, "--variants", *([variant] if variant in args.variants else []),
                   "--record", *([variant] if variant in args.record else [])]
            subprocess.run(cmd, check=True, cwd=ROOT)
        return
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    YAMLConfig = _stand_ins(args.official)
    OUT.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        print(f"{variant}: manifest {write_manifest(YAMLConfig, args.official, variant).name}", flush=True)
    for variant in args.record:
        record_outputs(YAMLConfig, args.official, variant, args.seed, [640, 480])


if __name__ == "__main__":
    main()
