"""Official RT-DETR / RT-DETRv2 checkpoints (lyuwenyu/RT-DETR ``.pth`` files) on the transformers implementation.

An official checkpoint stores the training model's state dict under ``ema.module`` (or ``model``) with the
official module names (``backbone.res_layers...``, ``encoder.input_proj...``, ``decoder.dec_score_head...``).
:data:`RULES` renames those keys onto ``RTDetrForObjectDetection`` / ``RTDetrV2ForObjectDetection``; every
tensor is shape-checked and a :class:`LoadReport` lists what is missing, unexpected or mis-shaped. Anything
short of a complete load is an error unless ``allow_partial=True``.

transformers ships no importable key mapping for these checkpoints (its conversion scripts are not part of
the installed package), so the mapping is written here as data and pinned by ``tests/test_official.py``
against manifests of the official models' parameter names and shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .config import ModelConfig, build_model, hf_config, load_config
from .contract import DeployModel
from .weights import _read_state_dict

OFFICIAL_CONFIGS = tuple(f"{prefix}_{backbone}" for prefix in ("rtdetr", "rtdetrv2")
                         for backbone in ("r18vd", "r34vd", "r50vd_m", "r50vd", "r101vd"))

# Group values renamed on the way: stem conv index, bottleneck branch, conv/norm module names, layer sub-modules.
_LOOKUP: dict[str, dict[str, str]] = {
    "stem": {"1": "0", "2": "1", "3": "2"},
    "branch": {"a": "0", "b": "1", "c": "2"},
    "mod": {"conv": "convolution", "norm": "normalization"},
    "enc": {"linear1": "mlp.fc1", "linear2": "mlp.fc2", "norm1": "self_attn_layer_norm", "norm2": "final_layer_norm"},
    "dec": {"linear1": "mlp.fc1", "linear2": "mlp.fc2", "norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm",
            "norm3": "final_layer_norm", "out_proj": "o_proj", "cross_attn": "encoder_attn"},
    "seq": {"0": "0", "conv": "0", "proj": "0", "1": "1", "norm": "1"},  # nn.Sequential index, RT-DETRv2's named one
}
_QKV = "{qkv}"  # a rule whose target holds this splits nn.MultiheadAttention's in_proj into q/k/v (dim 0)

# (official key regex, transformers key template): the first full match wins. {name} is the named group,
# renamed through _LOOKUP[name] where such a table exists. Covers RT-DETR and RT-DETRv2 (PResNet-vd backbones).
RULES: tuple[tuple[str, str], ...] = (
    (r"backbone\.conv1\.conv1_(?P<stem>[123])\.(?P<mod>conv|norm)\.(?P<p>\w+)",
     "model.backbone.model.embedder.embedder.{stem}.{mod}.{p}"),
    (r"backbone\.res_layers\.(?P<s>\d+)\.blocks\.(?P<l>\d+)\.branch2(?P<branch>[abc])\.(?P<mod>conv|norm)\.(?P<p>\w+)",
     "model.backbone.model.encoder.stages.{s}.layers.{l}.layer.{branch}.{mod}.{p}"),
    (r"backbone\.res_layers\.(?P<s>\d+)\.blocks\.(?P<l>\d+)\.short\.conv\.(?P<mod>conv|norm)\.(?P<p>\w+)",  # avg-pool + conv
     "model.backbone.model.encoder.stages.{s}.layers.{l}.shortcut.1.{mod}.{p}"),
    (r"backbone\.res_layers\.(?P<s>\d+)\.blocks\.(?P<l>\d+)\.short\.(?P<mod>conv|norm)\.(?P<p>\w+)",
     "model.backbone.model.encoder.stages.{s}.layers.{l}.shortcut.{mod}.{p}"),
    (r"(?P<part>encoder|decoder)\.input_proj\.(?P<j>\d+)\.(?P<seq>0|1|conv|norm)\.(?P<p>\w+)",
     "model.{part}_input_proj.{j}.{seq}.{p}"),
    (r"encoder\.encoder\.(?P<i>\d+)\.layers\.(?P<l>\d+)\.self_attn\.in_proj_(?P<p>weight|bias)",
     "model.encoder.aifi.{i}.layers.{l}.self_attn.{qkv}_proj.{p}"),
    (r"encoder\.encoder\.(?P<i>\d+)\.layers\.(?P<l>\d+)\.self_attn\.out_proj\.(?P<p>\w+)",
     "model.encoder.aifi.{i}.layers.{l}.self_attn.o_proj.{p}"),
    (r"encoder\.encoder\.(?P<i>\d+)\.layers\.(?P<l>\d+)\.(?P<enc>linear1|linear2|norm1|norm2)\.(?P<p>\w+)",
     "model.encoder.aifi.{i}.layers.{l}.{enc}.{p}"),
    (r"encoder\.(?P<rest>(?:lateral_convs|fpn_blocks|downsample_convs|pan_blocks)\..+)", "model.encoder.{rest}"),
    (r"decoder\.decoder\.layers\.(?P<i>\d+)\.self_attn\.in_proj_(?P<p>weight|bias)",
     "model.decoder.layers.{i}.self_attn.{qkv}_proj.{p}"),
    (r"decoder\.decoder\.layers\.(?P<i>\d+)\.self_attn\.(?P<dec>out_proj)\.(?P<p>\w+)",
     "model.decoder.layers.{i}.self_attn.{dec}.{p}"),
    (r"decoder\.decoder\.layers\.(?P<i>\d+)\.cross_attn\.num_points_scale",
     "model.decoder.layers.{i}.encoder_attn.n_points_scale"),
    (r"decoder\.decoder\.layers\.(?P<i>\d+)\.(?P<dec>cross_attn)\.(?P<rest>(?:sampling_offsets|attention_weights|value_proj|output_proj)\.\w+)",
     "model.decoder.layers.{i}.{dec}.{rest}"),
    (r"decoder\.decoder\.layers\.(?P<i>\d+)\.(?P<dec>linear1|linear2|norm1|norm2|norm3)\.(?P<p>\w+)",
     "model.decoder.layers.{i}.{dec}.{p}"),
    (r"decoder\.dec_score_head\.(?P<rest>.+)", "model.decoder.class_embed.{rest}"),
    (r"decoder\.dec_bbox_head\.(?P<rest>.+)", "model.decoder.bbox_embed.{rest}"),
    (r"decoder\.query_pos_head\.(?P<rest>.+)", "model.decoder.query_pos_head.{rest}"),
    (r"decoder\.enc_output\.(?P<seq>0|1|proj|norm)\.(?P<p>\w+)", "model.enc_output.{seq}.{p}"),
    (r"decoder\.(?P<rest>(?:enc_score_head|enc_bbox_head|denoising_class_embed)\..+)", "model.{rest}"),
)
_COMPILED = tuple((re.compile(pattern), template) for pattern, template in RULES)

# Official tensors with no counterpart, by design: BatchNorm step counters where transformers freezes the
# backbone's norms (ignored only where the model has no such counter), and RT-DETRv2's precomputed anchors
# (transformers computes them from the input size).
IGNORED = (re.compile(r".*\.num_batches_tracked"), re.compile(r"decoder\.(anchors|valid_mask)"))


@dataclass
class LoadReport:
    """What an official checkpoint's load did: keys in transformers naming unless said otherwise."""

    config: str
    num_classes: int | None = None  # from the checkpoint's class head
    loaded: int = 0  # model tensors filled from the checkpoint
    missing: list[str] = field(default_factory=list)  # model tensors the checkpoint does not provide
    unexpected: list[str] = field(default_factory=list)  # official keys (official naming) with no place in the model
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (key, checkpoint, model)
    ignored: list[str] = field(default_factory=list)  # official keys deliberately not loaded (see IGNORED), official naming

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def summary(self, limit: int = 5) -> str:
        def few(items: list[str]) -> str:
            return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")

        lines = [f"config {self.config}: {self.loaded} tensors loaded, {len(self.ignored)} ignored"]
        if self.missing:
            lines.append(f"missing: {few(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected: {few(self.unexpected)}")
        if self.misshaped:
            lines.append("mis-shaped (checkpoint vs model): " + few([f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in self.misshaped]))
        return "; ".join(lines)


def official_key(key: str) -> list[str] | None:
    """The transformers key(s) of one official key (three for a q/k/v in_proj), or None if no rule matches."""
    for pattern, template in _COMPILED:
        m = pattern.fullmatch(key)
        if m:
            groups = {k: _LOOKUP[k][v] if k in _LOOKUP else v for k, v in m.groupdict().items()}
            if _QKV in template:
                return [template.format(qkv=x, **groups) for x in ("q", "k", "v")]
            return [template.format(**groups)]
    return None


def looks_official(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the official RT-DETR module names (backbone/encoder/decoder, official heads)."""
    return any(k.startswith("decoder.dec_score_head.") for k in state) and any(k.startswith("encoder.") for k in state)


def checkpoint_model_type(state: Mapping[str, torch.Tensor]) -> str:
    """``rt_detr_v2`` if the decoder has RT-DETRv2's per-point sampling scales, else ``rt_detr``."""
    return "rt_detr_v2" if any(k.endswith("cross_attn.num_points_scale") for k in state) else "rt_detr"


def remap_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], list[str]]:
    """(transformers-named tensors, their official keys, official keys no rule maps, official keys ignored by design).

    Tensors are not copied: a renamed key holds the same tensor, an in_proj is split into views."""
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmapped: list[str] = []
    ignored: list[str] = []
    for key, tensor in state.items():
        targets = official_key(key)
        if targets is None:
            (ignored if any(p.fullmatch(key) for p in IGNORED) else unmapped).append(key)
            continue
        parts = tensor.chunk(3, dim=0) if len(targets) == 3 else (tensor,)
        mapped.update(zip(targets, parts))
        origin.update(dict.fromkeys(targets, key))
    return mapped, origin, unmapped, ignored


def _signature(values: Mapping[str, object]) -> dict[str, object]:
    return {k: values[k] for k in ("model_type", "layer_type", "depths", "encoder_hidden_dim", "hidden_expansion", "decoder_layers")}


def _config_signature(cfg: ModelConfig) -> dict[str, object]:
    hf = hf_config(cfg)
    return _signature({"model_type": cfg.model_type, "layer_type": hf.backbone_config.layer_type, "depths": list(hf.backbone_config.depths),
                       "encoder_hidden_dim": hf.encoder_hidden_dim, "hidden_expansion": float(hf.hidden_expansion),
                       "decoder_layers": hf.decoder_layers})


def _checkpoint_signature(state: Mapping[str, torch.Tensor], mapped: Mapping[str, torch.Tensor]) -> dict[str, object]:
    stage = re.compile(r"model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.0\.convolution\.weight")
    blocks: dict[int, int] = {}
    for key in mapped:
        m = stage.fullmatch(key)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    needed = ("model.encoder_input_proj.0.0.weight", "model.encoder.fpn_blocks.0.conv1.conv.weight")
    if not blocks or any(k not in mapped for k in needed):
        raise CheckpointError("not an RT-DETR checkpoint with a PResNet-vd backbone (the toolkit's official configs): "
                              f"no backbone res_layers or encoder input projection; first keys: {', '.join(list(state)[:5])}")
    hidden = mapped[needed[0]].shape[0]
    decoder_layers = len({k.split(".")[3] for k in mapped if k.startswith("model.decoder.class_embed.")})
    return _signature({"model_type": checkpoint_model_type(state),
                       "layer_type": "bottleneck" if any(".layer.2.convolution." in k for k in mapped) else "basic",
                       "depths": [blocks[i] for i in sorted(blocks)], "encoder_hidden_dim": hidden,
                       "hidden_expansion": mapped[needed[1]].shape[0] / hidden, "decoder_layers": decoder_layers})


def infer_config(state: Mapping[str, torch.Tensor]) -> str:
    """The official config whose architecture matches an official state dict's shapes (class count aside)."""
    if not looks_official(state):
        raise CheckpointError("not an official RT-DETR checkpoint: no decoder.dec_score_head.* / encoder.* keys; "
                              f"first keys: {', '.join(list(state)[:5])}")
    mapped, _, _, _ = remap_state_dict(state)
    found = _checkpoint_signature(state, mapped)
    matches = [name for name in OFFICIAL_CONFIGS if _config_signature(load_config(name)) == found]
    if not matches:
        raise CheckpointError(f"no official config matches the checkpoint's architecture {found}; "
                              f"known: {', '.join(OFFICIAL_CONFIGS)} (a custom one can be given as config=path.json)")
    return matches[0]


def plan_load(model: nn.Module, state: Mapping[str, torch.Tensor], config: str = "") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Remap an official state dict onto a transformers RT-DETR ``model`` and check every name and shape.

    Returns the tensors that fit (transformers naming) and the report. Nothing is loaded; works on meta tensors.
    Tied tensors (transformers shares the decoder's heads at the top level) count once.
    """
    mapped, origin, unmapped, ignored = remap_state_dict(state)
    target = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in target.items():
        groups.setdefault(id(tensor), []).append(name)
    fits: dict[str, torch.Tensor] = {}
    report = LoadReport(config=config, unexpected=sorted(unmapped), ignored=sorted(ignored))
    head = mapped.get("model.decoder.class_embed.0.weight")
    report.num_classes = int(head.shape[0]) if head is not None else None
    for key, tensor in mapped.items():
        if key not in target:  # a frozen-norm step counter is ignored, anything else is unexpected
            (report.ignored if any(p.fullmatch(origin[key]) for p in IGNORED) else report.unexpected).append(origin[key])
        elif tuple(tensor.shape) != tuple(target[key].shape):
            report.misshaped.append((key, tuple(tensor.shape), tuple(target[key].shape)))
        else:
            fits[key] = tensor
    report.missing = sorted(names[0] for names in groups.values() if not any(n in fits for n in names))
    report.loaded = len(groups) - len(report.missing)
    return fits, report


def load_official_state_dict(model: DeployModel, state: Mapping[str, torch.Tensor], *, allow_partial: bool = False) -> LoadReport:
    """Load an official state dict into a built transformers model; incomplete is an error unless ``allow_partial``."""
    fits, report = plan_load(model.model, state, model.name)
    if not report.complete and not allow_partial:
        hint = ""
        if report.num_classes is not None and report.num_classes != model.num_classes:
            hint = (f"; the checkpoint has {report.num_classes} classes and config {model.name!r} {model.num_classes}: give a "
                    f"config (JSON path) with {report.num_classes} class_names, or allow_partial=True to leave the class heads untrained")
        raise ConfigError(f"the checkpoint does not fit config {model.name!r} ({report.summary()}){hint}")
    with torch.no_grad():
        model.model.load_state_dict(fits, strict=False)
    return report


def load_official_checkpoint(path: str | Path | Mapping[str, torch.Tensor], config: str | Path | None = None,
                             allow_partial: bool = False, *, name: str | None = None) -> DeployModel:
    """An official RT-DETR/RT-DETRv2 checkpoint (``.pth``: ``ema.module`` or ``model`` state dict) as a DeployModel.

    ``path`` may also be a state dict already read (``name`` then names it in messages). ``config`` is a config
    name or JSON path; without it the config is inferred from the checkpoint's shapes. The pickle is read with
    ``weights_only=True``: checkpoints holding arbitrary objects are refused. The load's :class:`LoadReport`
    is attached as ``model.load_report``.
    """
    state = path if isinstance(path, Mapping) else _read_state_dict(Path(path))
    where = name or ("the state dict" if isinstance(path, Mapping) else str(path))
    if not looks_official(state):
        raise CheckpointError(f"{where}: not an official RT-DETR checkpoint (no decoder.dec_score_head.* / encoder.* keys); "
                              f"first keys: {', '.join(list(state)[:5])}")
    try:
        cfg = load_config(config if config is not None else infer_config(state))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    found = checkpoint_model_type(state)
    if cfg.model_type != found:
        raise ConfigError(f"{where}: config {cfg.name!r} is {cfg.model_type} but the checkpoint is {found}")
    model = build_model(cfg)
    try:
        model.load_report = load_official_state_dict(model, state, allow_partial=allow_partial)
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
