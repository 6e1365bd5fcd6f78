"""Run the OFFICIAL lyuwenyu/RT-DETR model code on seeded weights and store its deploy outputs as test data.

Not part of CI (it needs the official repository): CI reads what this writes, ``tests/data/official_outputs/VARIANT.json``,
and checks that the toolkit's remap of the same seeded checkpoint reproduces it (``tests/test_official_parity.py``).

    git --git-dir=<mirror of lyuwenyu/RT-DETR> archive HEAD | tar -x -C /tmp/rtdetr_official
    pip install --target /tmp/official_deps tensorboard   # what the official code imports and the toolkit's venv lacks
    python tools/official_parity.py --official /tmp/rtdetr_official --deps /tmp/official_deps [--variants NAME ...]

Per variant: the official YAML is instantiated with the official ``YAMLConfig`` (``pretrained: False``,
``eval_spatial_size`` = the test input size), the seeded state dict of :mod:`toolkit.testing.official_weights`
is loaded into it strictly, the model and postprocessor are switched to deploy mode as the official
``tools/export_onnx.py`` does, and run on seeded images in float64 (the reference: no rounding of discrete
sampling flips) and float32 (how far fp32 strays from it, stored as the noise floor). The encoder's top-K
selection must have a clear gap at its boundary (else the next seed is tried); near-equal final scores need no
gap, because the test matches detections up to a permutation (``toolkit.export.permutation``). Only facts are stored: seed, input size, the weights' sha256, the gap, the top-K labels, boxes, scores.
v1 and v2 both name their package ``src``, so each version runs in its own subprocess.
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
MANIFESTS = ROOT / "tests" / "data" / "official_manifests"
OUT = ROOT / "tests" / "data" / "official_outputs"

# variant (= toolkit config) -> (official package, YAML, manifest of its tensors)
VARIANTS = {
    **{f"rtdetr_{b}": ("rtdetr_pytorch", f"configs/rtdetr/rtdetr_{b}_6x_coco.yml", f"rtdetr_{b}") for b in ("r18vd", "r34vd", "r50vd", "r50vd_m", "r101vd")},
    "rtdetrv2_r18vd": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r18vd_120e_coco.yml", "rtdetrv2_r18vd"),
    "rtdetrv2_r34vd": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r34vd_120e_coco.yml", "rtdetrv2_r34vd"),
    "rtdetrv2_r50vd": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r50vd_6x_coco.yml", "rtdetrv2_r50vd"),
    "rtdetrv2_r50vd_m": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r50vd_m_7x_coco.yml", "rtdetrv2_r50vd_m"),
    "rtdetrv2_r101vd": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r101vd_6x_coco.yml", "rtdetrv2_r101vd"),
    "rtdetrv2_r18vd_dsp": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r18vd_dsp_3x_coco.yml", "rtdetrv2_r18vd"),
    "rtdetrv2_r34vd_dsp": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r34vd_dsp_1x_coco.yml", "rtdetrv2_r34vd"),
    "rtdetrv2_r50vd_dsp": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r50vd_dsp_1x_coco.yml", "rtdetrv2_r50vd"),
    "rtdetrv2_r50vd_m_dsp": ("rtdetrv2_pytorch", "configs/rtdetrv2/rtdetrv2_r50vd_m_dsp_3x_coco.yml", "rtdetrv2_r50vd_m"),
    **{f"rtdetrv2_r18vd_sp{n}": ("rtdetrv2_pytorch", f"configs/rtdetrv2/rtdetrv2_r18vd_sp{n}_120e_coco.yml", f"rtdetrv2_r18vd_sp{n}") for n in (1, 2, 3)},
}
ORIG_SIZES = [[640, 480], [500, 375]]  # (w, h) of the two "original" images: distinct, non-square
MIN_GAP = 1e-3  # default: selection logits, the 300th and 301st must differ by this much (fp32 noise is ~1e-5)


def _import_official(official: Path, package: str, deps: Path | None):
    sys.path.insert(0, str(official / package))
    if deps is not None:
        sys.path.append(str(deps))  # after the venv: only what the venv lacks (tensorboard) comes from there
    if package == "rtdetr_pytorch":
        # v1's data package needs torchvision.datapoints (torchvision < 0.16); the model never touches it
        sys.modules["src.data"] = types.ModuleType("src.data")
    import src  # noqa: F401  (registers the official modules)
    from src.core import YAMLConfig

    return YAMLConfig


def _commit(official: Path) -> str:
    stamp = official / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else "unknown"


def _selection_gap(model, images, num_queries: int = 300) -> float:
    import torch

    captured = {}
    handle = model.decoder.enc_score_head.register_forward_hook(lambda _m, _i, out: captured.__setitem__("s", out))
    with torch.no_grad():
        model(images)
    handle.remove()
    ordered = captured["s"].max(-1).values.sort(dim=1, descending=True).values
    return float((ordered[:, num_queries - 1] - ordered[:, num_queries]).min())


def worker(args) -> None:
    import copy

    import torch

    from toolkit.testing.official_weights import parity_inputs, read_manifest, state_sha256, official_state_dict

    torch.set_num_threads(args.threads)
    YAMLConfig = _import_official(args.official, args.package, args.deps)
    size = [args.size, args.size]
    for variant in args.variants:
        package, yaml, manifest_name = VARIANTS[variant]
        extra = ({"eval_spatial_size": size} if package == "rtdetrv2_pytorch" else
                 {"HybridEncoder": {"eval_spatial_size": size}, "RTDETRTransformer": {"eval_spatial_size": size}})
        cfg = YAMLConfig(str(args.official / package / yaml), PResNet={"pretrained": False}, **extra)
        model, post = cfg.model, cfg.postprocessor
        official_tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "parameter": False}
                            for k, v in model.state_dict().items()}
        params = {k for k, _ in model.named_parameters()}
        for k in official_tensors:
            official_tensors[k]["parameter"] = k in params
        manifest_path = MANIFESTS / f"{manifest_name}.json"
        if not manifest_path.is_file():  # a variant with tensors of its own (sp): its manifest, from the official model at 640
            full = YAMLConfig(str(args.official / package / yaml), PResNet={"pretrained": False}).model.state_dict()
            tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "parameter": k in params} for k, v in full.items()}
            header = {"config": manifest_name, "source": f"lyuwenyu/RT-DETR@{_commit(args.official)}: the state_dict() of the official "
                      f"model built by {package}'s YAMLConfig from {yaml} (80 classes, 640x640); names, shapes and dtypes only",
                      "method": "read from the official model definitions by instantiating them (not derived from this toolkit's remap)",
                      "num_parameters": sum(p.numel() for p in model.parameters()), "num_tensors": len(tensors)}
            manifest_path.write_text("{\n\"header\": " + json.dumps(header, indent=1) + ",\n\"tensors\": {\n"
                                     + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in tensors.items()) + "\n}\n}\n")
        manifest = read_manifest(manifest_path)
        if args.manifests_only:
            print(f"{variant}: manifest {manifest_path.name}", flush=True)
            continue
        mismatch = [k for k in set(manifest) | set(official_tensors)
                    if k not in ("decoder.anchors", "decoder.valid_mask") and manifest.get(k, {}).get("shape") != official_tensors.get(k, {}).get("shape")]
        if mismatch:
            raise SystemExit(f"{variant}: manifest {manifest_path.name} differs from the official model: {sorted(mismatch)[:5]}")
        images, sizes = parity_inputs(args.seed, size, ORIG_SIZES)
        for attempt in range(20):
            seed = args.seed + attempt
            state = official_state_dict(manifest, seed, size)
            model.load_state_dict(state, strict=True)  # every name, shape: the official model takes exactly these
            model.eval()
            gap = _selection_gap(model, images)
            if gap >= args.min_gap:
                break
            print(f"{variant}: seed {seed}: selection gap {gap:.2e} < {args.min_gap}, next seed", flush=True)
        else:
            raise SystemExit(f"{variant}: no tie-free seed")
        deploy = copy.deepcopy(model).deploy()
        post = post.deploy()
        with torch.no_grad():
            labels64, boxes64, scores64 = post(deploy.double()(images.double()), sizes)
            labels32, boxes32, scores32 = post(copy.deepcopy(model).deploy()(images), sizes)
        k = args.top_k
        out = []
        for i in range(len(ORIG_SIZES)):
            s = scores64[i]
            out.append({"labels": labels64[i, :k].tolist(), "boxes": [[round(v, 5) for v in b] for b in boxes64[i, :k].tolist()],
                        "scores": [round(v, 8) for v in s[:k].tolist()]})
        # fp32 vs the float64 reference, per detection of the top-K (the same query and class in both: matched by index)
        from toolkit.export.permutation import match_permutation

        dev_box = dev_score = 0.0
        for i in range(len(ORIG_SIZES)):
            m = match_permutation({"labels": labels64[i, :k], "boxes": boxes64[i, :k], "scores": scores64[i, :k]},
                                  {"labels": labels32[i], "boxes": boxes32[i], "scores": scores32[i]}, score_band=0.0)
            dev_box, dev_score = max(dev_box, m.max_box_diff), max(dev_score, m.max_score_diff)
        record = {
            "variant": variant,
            "official": {"repository": "lyuwenyu/RT-DETR", "commit": _commit(args.official), "package": package, "yaml": yaml,
                         "deploy": "cfg.model.deploy() + cfg.postprocessor.deploy(), as tools/export_onnx.py"},
            "manifest": manifest_name, "seed": seed, "input_size": size, "image_seed": args.seed, "orig_target_sizes": ORIG_SIZES,
            "state_sha256": state_sha256(state), "selection_gap": gap, "min_gap": args.min_gap, "top_k": k,
            "reference": "float64 (the official model and postprocessor in double precision)",
            "official_fp32_deviation": {"box_px": dev_box, "score": dev_score},
            "produced": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                         "date": datetime.date.today().isoformat(), "command": "python tools/official_parity.py"},
            "outputs": out,
        }
        (args.out / f"{variant}.json").write_text(json.dumps(record, separators=(",", ":")) + "\n")
        print(f"{variant}: seed {seed}, selection gap {gap:.3g}, fp32 vs float64: box {dev_box:.3g} px, score {dev_score:.2g}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="an exported tree of lyuwenyu/RT-DETR (with a COMMIT file)")
    ap.add_argument("--deps", type=Path, default=None, help="a pip --target folder with what the official code imports")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--size", type=int, default=256, help="square input size (multiple of 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", type=int, default=50, help="detections stored per image (of the official 300)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-gap", type=float, default=MIN_GAP, help="the selection gap required (logits)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--manifests-only", action="store_true", help="only write the manifests of variants that lack one")
    ap.add_argument("--package", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.package:
        return worker(args)
    for package in ("rtdetr_pytorch", "rtdetrv2_pytorch"):
        chosen = [v for v in args.variants if VARIANTS[v][0] == package]
        if chosen:
            cmd = [sys.executable, __file__, "--official", str(args.official), "--size", str(args.size), "--seed", str(args.seed),
                   "--top-k", str(args.top_k), "--threads", str(args.threads), "--min-gap", str(args.min_gap), *(["--manifests-only"] if args.manifests_only else []), "--out", str(args.out), "--package", package,
                   "--variants", *chosen] + (["--deps", str(args.deps)] if args.deps else [])
            subprocess.run(cmd, check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
