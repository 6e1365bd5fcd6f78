"""Official RT-DETR / RT-DETRv2 checkpoints (lyuwenyu/RT-DETR ``.pth`` files) on the transformers implementation.

An official checkpoint stores the training model's state dict under ``ema.module`` (or ``model``) with the
official module names. :mod:`toolkit.models.official_remap` renames those keys onto
``RTDetrForObjectDetection`` / ``RTDetrV2ForObjectDetection`` and shape-checks every tensor; this module picks the
config (every variant of the official zoo: backbones, ``_m`` with ``eval_idx``, v2 discrete sampling ``_dsp``,
``num_points`` ``_sp``), loads, and refuses what transformers cannot compute, naming the fix.

What the weights cannot tell is never guessed: bilinear and discrete sampling (``cross_attn_method``) have
identical tensors, so an RT-DETRv2 checkpoint without a config is **inconclusive** (a :class:`ConfigError`
listing the candidate configs) unless its file name decides (the official zoo names its discrete-sampling
models ``*_dsp_*``). Official training checkpoints store no config of their own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .config import ModelConfig, build_model, hf_config, load_config
from .contract import DeployModel
from .official_remap import (  # noqa: F401  (re-exported: the public names of the official-checkpoint API)
    IGNORED,
    RULES,
    LoadReport,
    checkpoint_model_type,
    looks_official,
    official_key,
    plan_load,
    remap_state_dict,
)
from .weights import _read_state_dict

OFFICIAL_CONFIGS = (*(f"{prefix}_{backbone}" for prefix in ("rtdetr", "rtdetrv2") for backbone in ("r18vd", "r34vd", "r50vd_m", "r50vd", "r101vd")),
                    *(f"rtdetrv2_{b}_dsp" for b in ("r18vd", "r34vd", "r50vd_m", "r50vd")),
                    *(f"rtdetrv2_r18vd_sp{n}" for n in (1, 2, 3)))

_SCALE_KEY = "decoder.decoder.layers.0.cross_attn.num_points_scale"
_ATTN_KEY = "model.decoder.layers.0.encoder_attn.attention_weights.weight"
_OFFICIAL_EXPORT_FIX = ("export it with the official code (rtdetrv2_pytorch/tools/export_onnx.py) and give that ONNX file to "
                        "rtdetr-deploy build/run/compare")


def _signature(values: Mapping[str, object]) -> dict[str, object]:
    return {k: values[k] for k in ("model_type", "layer_type", "depths", "encoder_hidden_dim", "hidden_expansion", "decoder_layers",
                                   "sampling_points")}


def trained_decoder_layers(cfg: ModelConfig) -> int:
    """Decoder layers of the official model the config deploys (more than the deployed ones for ``eval_idx`` models)."""
    return int(cfg.official.get("decoder_layers", hf_config(cfg).decoder_layers))


def deployed_layers(cfg: ModelConfig) -> int | None:
    """Decoder layers deployed when the official model evaluates an earlier layer (``eval_idx``), else None."""
    idx = cfg.official.get("eval_idx")
    return None if idx is None or idx < 0 else int(idx) + 1


def _config_signature(cfg: ModelConfig) -> dict[str, object]:
    hf = hf_config(cfg)
    return _signature({"model_type": cfg.model_type, "layer_type": hf.backbone_config.layer_type, "depths": list(hf.backbone_config.depths),
                       "encoder_hidden_dim": hf.encoder_hidden_dim, "hidden_expansion": float(hf.hidden_expansion),
                       "decoder_layers": trained_decoder_layers(cfg),
                       "sampling_points": hf.decoder_attention_heads * hf.num_feature_levels * hf.decoder_n_points})


def _checkpoint_signature(state: Mapping[str, torch.Tensor], mapped: Mapping[str, torch.Tensor]) -> dict[str, object]:
    stage = re.compile(r"model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.0\.convolution\.weight")
    blocks: dict[int, int] = {}
    for key in mapped:
        m = stage.fullmatch(key)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    needed = ("model.encoder_input_proj.0.0.weight", "model.encoder.fpn_blocks.0.conv1.conv.weight", _ATTN_KEY)
    if not blocks or any(k not in mapped for k in needed):
        raise CheckpointError("not an RT-DETR checkpoint with a PResNet-vd backbone (the toolkit's official configs): "
                              f"no backbone res_layers, encoder input projection or decoder; first keys: {', '.join(list(state)[:5])}")
    hidden = mapped[needed[0]].shape[0]
    decoder_layers = len({k.split(".")[3] for k in mapped if k.startswith("model.decoder.class_embed.")})
    return _signature({"model_type": checkpoint_model_type(state),
                       "layer_type": "bottleneck" if any(".layer.2.convolution." in k for k in mapped) else "basic",
                       "depths": [blocks[i] for i in sorted(blocks)], "encoder_hidden_dim": hidden,
                       "hidden_expansion": mapped[needed[1]].shape[0] / hidden, "decoder_layers": decoder_layers,
                       "sampling_points": mapped[_ATTN_KEY].shape[0]})


def points_per_level(state: Mapping[str, torch.Tensor]) -> list[int] | None:
    """RT-DETRv2's official ``num_points`` list, read back from its ``num_points_scale`` buffer (``1/n`` repeated
    ``n`` times per level); None for RT-DETR, meta tensors or a buffer that is not such a scale."""
    scale = state.get(_SCALE_KEY)
    if scale is None or scale.is_meta:
        return None
    values, points, i = scale.double().tolist(), [], 0
    while i < len(values):
        n = round(1 / values[i]) if values[i] > 0 else 0
        if n < 1 or i + n > len(values) or any(abs(v * n - 1) > 1e-3 for v in values[i:i + n]):
            return None
        points.append(n)
        i += n
    return points


def check_expressible(state: Mapping[str, torch.Tensor], where: str = "the checkpoint") -> None:
    """Refuse, naming the fix, official models transformers cannot compute: ``num_points`` that differ per level
    (transformers' ``decoder_n_points`` is one number for all levels) and class-agnostic query selection."""
    points = points_per_level(state)
    if points is not None and len(set(points)) > 1:
        raise ConfigError(f"{where}: the decoder samples num_points {points} (per feature level); transformers' RT-DETRv2 "
                          "samples the same number of points on every level (decoder_n_points), so it cannot compute this model: "
                          + _OFFICIAL_EXPORT_FIX)
    enc, dec = state.get("decoder.enc_score_head.weight"), state.get("decoder.dec_score_head.0.weight")
    if enc is not None and dec is not None and enc.shape[0] == 1 and dec.shape[0] > 1:
        raise ConfigError(f"{where}: class-agnostic query selection (query_select_method: agnostic, a 1-class enc_score_head) is "
                          "not in transformers' RT-DETR: " + _OFFICIAL_EXPORT_FIX)


def _decide_by_name(name: str | None, candidates: list[str]) -> list[str]:
    """The candidates the checkpoint's own file name allows: an official zoo name (``rtdetrv2_r18vd_dsp_3x_coco.pth``,
    ``rtdetrv2_r50vd_6x_coco_ema.pth``) says whether it samples discretely (``dsp``); any other name decides nothing."""
    if not name:
        return candidates
    tokens = Path(str(name)).stem.lower().replace("-", "_").split("_")
    if not tokens or tokens[0] not in ("rtdetr", "rtdetrv2"):
        return candidates
    discrete = "dsp" in tokens
    return [c for c in candidates if (load_config(c).hf_config.get("decoder_method") == "discrete") == discrete]


def infer_config(state: Mapping[str, torch.Tensor], name: str | None = None) -> str:
    """The official config whose architecture matches an official state dict (class count aside).

    ``name`` (the checkpoint's file name) decides between variants with identical tensors (bilinear vs discrete
    sampling); where nothing decides, a :class:`ConfigError` lists the candidates."""
    if not looks_official(state):
        raise CheckpointError("not an official RT-DETR checkpoint: no decoder.dec_score_head.* / encoder.* keys; "
                              f"first keys: {', '.join(list(state)[:5])}")
    check_expressible(state)
    mapped, _, _, _ = remap_state_dict(state)
    found = _checkpoint_signature(state, mapped)
    matches = [c for c in OFFICIAL_CONFIGS if _config_signature(load_config(c)) == found]
    if not matches:
        raise CheckpointError(f"no official config matches the checkpoint's architecture {found}; "
                              f"known: {', '.join(OFFICIAL_CONFIGS)} (a custom one can be given as config=path.json)")
    decided = _decide_by_name(name, matches)
    if len(decided) != 1:
        raise ConfigError(f"inconclusive: the weights fit {len(matches)} official configs ({', '.join(matches)}) that differ only "
                          "in the decoder's sampling (bilinear, or discrete for the *_dsp models: identical tensors), and "
                          f"{'the file name does not say which' if name else 'no file name says which'}; "
                          f"give the config: --config {matches[0]} or --config {matches[-1]}")
    return decided[0]


def _points_hint(state: Mapping[str, torch.Tensor], report: LoadReport, model: DeployModel) -> str:
    if not any(".encoder_attn.sampling_offsets." in k or ".encoder_attn.attention_weights." in k for k, _, _ in report.misshaped):
        return ""
    points = points_per_level(state)
    found = points[0] if points else None
    if found is None and (w := state.get("decoder.decoder.layers.0.cross_attn.attention_weights.weight")) is not None:
        hf = model.model.config
        found = w.shape[0] // (hf.decoder_attention_heads * hf.num_feature_levels)
    v2 = checkpoint_model_type(state) == "rt_detr_v2"
    fix = f"use config rtdetrv2_r18vd_sp{found} where it fits, or a" if v2 and found in (1, 2, 3) else "use a"
    return (f"; the checkpoint samples {found} point(s) per level (official num_points {[found] * 3}), config {model.name!r} "
            f"{model.model.config.decoder_n_points}: {fix} config (JSON path) with hf_config decoder_n_points: {found}")


def load_official_state_dict(model: DeployModel, state: Mapping[str, torch.Tensor], *, allow_partial: bool = False,
                             deployed_layers: int | None = None) -> LoadReport:
    """Load an official state dict into a built transformers model; incomplete is an error unless ``allow_partial``.

    ``deployed_layers``: the model deploys the official ``eval_idx`` layer; later decoder layers are dropped and
    listed in ``LoadReport.dropped`` (that alone does not make the load incomplete)."""
    fits, report = plan_load(model.model, state, model.name, deployed_layers)
    if not report.complete and not allow_partial:
        hint = _points_hint(state, report, model)
        if report.num_classes is not None and report.num_classes != model.num_classes:
            hint += (f"; the checkpoint has {report.num_classes} classes and config {model.name!r} {model.num_classes}: give a "
                     f"config (JSON path) with {report.num_classes} class_names, or allow_partial=True to leave the class heads untrained")
        raise ConfigError(f"the checkpoint does not fit config {model.name!r} ({report.summary()}){hint}")
    with torch.no_grad():
        model.model.load_state_dict(fits, strict=False)
    return report


def load_official_checkpoint(path: str | Path | Mapping[str, torch.Tensor], config: str | Path | None = None,
                             allow_partial: bool = False, *, name: str | None = None) -> DeployModel:
    """An official RT-DETR/RT-DETRv2 checkpoint (``.pth``: ``ema.module`` or ``model`` state dict) as a DeployModel.

    ``path`` may also be a state dict already read (``name``, its file name, then names it in messages and
    decides between variants the weights cannot tell apart). ``config`` is a config name or JSON path; without it
    the config is inferred (:func:`infer_config`). The pickle is read with ``weights_only=True``: checkpoints
    holding arbitrary objects are refused. The load's :class:`LoadReport` is attached as ``model.load_report``.
    """
    state = path if isinstance(path, Mapping) else _read_state_dict(Path(path))
    where = name or ("the state dict" if isinstance(path, Mapping) else str(path))
    if not looks_official(state):
        raise CheckpointError(f"{where}: not an official RT-DETR checkpoint (no decoder.dec_score_head.* / encoder.* keys); "
                              f"first keys: {', '.join(list(state)[:5])}")
    check_expressible(state, where)
    file_name = name if isinstance(path, Mapping) else (name or str(path))
    try:
        cfg = load_config(config if config is not None else infer_config(state, name=file_name))
    except (CheckpointError, ConfigError) as e:
        raise type(e)(f"{where}: {e}") from None
    found = checkpoint_model_type(state)
    if cfg.model_type != found:
        raise ConfigError(f"{where}: config {cfg.name!r} is {cfg.model_type} but the checkpoint is {found}")
    model = build_model(cfg)
    try:
        model.load_report = load_official_state_dict(model, state, allow_partial=allow_partial, deployed_layers=deployed_layers(cfg))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return model


def inference_parameter_count(model: nn.Module) -> int:
    """Parameters of a transformers RT-DETR that inference uses, comparable with the published model sizes.

    All parameters (tied ones once) minus the training-only ones: the denoising class embedding and the class
    heads of the decoder layers before the last (their scores only feed auxiliary losses). Frozen BatchNorm
    affines are buffers, as in the official R50/R101 backbones, and are not counted.
    """
    inner = model.model
    training_only = [inner.denoising_class_embed, *inner.decoder.class_embed[:-1]]
    skip = {id(p) for m in training_only for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
