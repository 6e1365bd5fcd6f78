"""The key remap of official RT-DETR / RT-DETRv2 checkpoints (lyuwenyu/RT-DETR ``.pth`` files) onto transformers.

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
from typing import Mapping

import torch
from torch import nn

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
# the decoder layer index of an official decoder key (layer, class head or box head)
_LAYER_INDEX = re.compile(r"decoder\.(?:decoder\.layers|dec_score_head|dec_bbox_head)\.(\d+)\.")


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
    # official keys of the decoder layers after the official eval_idx (official naming): trained, never evaluated
    # by the official model, so not part of the deployed one (configs with ``official.eval_idx``)
    dropped: list[str] = field(default_factory=list)
    deployed_layers: int | None = None  # decoder layers the deployed model runs, where layers were dropped

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def dropped_note(self) -> str | None:
        """One line on the dropped decoder layers (None if none were dropped), for load and export output."""
        if not self.dropped:
            return None
        layers = sorted({int(m[1]) for k in self.dropped if (m := _LAYER_INDEX.match(k))})
        return (f"{len(self.dropped)} official tensors of decoder layers {layers[0] + 1}-{layers[-1] + 1} not loaded: the official "
                f"model evaluates at decoder layer {self.deployed_layers} (eval_idx {self.deployed_layers - 1}), so the deployed "
                f"model runs {self.deployed_layers} layers, as the official deploy does")

    def summary(self, limit: int = 5) -> str:
        def few(items: list[str]) -> str:
            return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")

        lines = [f"config {self.config}: {self.loaded} tensors loaded, {len(self.ignored)} ignored"]
        if self.dropped:
            lines.append(f"dropped: {self.dropped_note()}")
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


def plan_load(model: nn.Module, state: Mapping[str, torch.Tensor], config: str = "",
              deployed_layers: int | None = None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Remap an official state dict onto a transformers RT-DETR ``model`` and check every name and shape.

    Returns the tensors that fit (transformers naming) and the report. Nothing is loaded; works on meta tensors.
    Tied tensors (transformers shares the decoder's heads at the top level) count once. ``deployed_layers``: the
    model deploys the official eval_idx layer, so official decoder layers from this index on are dropped (and
    reported), not unexpected.
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
    report.deployed_layers = deployed_layers
    for key, tensor in mapped.items():
        if key not in target:  # a frozen-norm step counter is ignored, a layer past eval_idx dropped, anything else unexpected
            layer = _LAYER_INDEX.match(origin[key])
            if deployed_layers is not None and layer and int(layer[1]) >= deployed_layers:
                report.dropped.append(origin[key])
            else:
                (report.ignored if any(p.fullmatch(origin[key]) for p in IGNORED) else report.unexpected).append(origin[key])
        elif tuple(tensor.shape) != tuple(target[key].shape):
            report.misshaped.append((key, tuple(tensor.shape), tuple(target[key].shape)))
        else:
            fits[key] = tensor
    # a q/k/v in_proj maps to three keys: list each official key once
    report.unexpected, report.ignored, report.dropped = (list(dict.fromkeys(x)) for x in (report.unexpected, report.ignored, report.dropped))
    report.missing = sorted(names[0] for names in groups.values() if not any(n in fits for n in names))
    report.loaded = len(groups) - len(report.missing)
    return fits, report
