"""Official D-FINE checkpoints (Peterande/D-FINE ``.pth`` files) on transformers' ``DFineForObjectDetection``.

An official checkpoint stores the training model's state dict (``model`` or ``ema.module``) with the official
module names (``backbone.stem...``, ``encoder.fpn_blocks.0.cv2.0...``, ``decoder.dec_score_head...``).
:data:`RULES` renames them onto transformers (the mapping of transformers' own
``convert_d_fine_original_pytorch_checkpoint_to_hf.py``, restated as data over today's module names); every
tensor is shape-checked into the same :class:`~toolkit.models.official.LoadReport` as RT-DETR's remap.
The config is inferred by fitting the checkpoint to each named D-FINE config: exactly one complete fit, or a
refusal that says the weights cannot decide. Pinned by ``tests/test_official_dfine.py`` against manifests read
from the official model code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from .config import available_configs, build_model, load_config
from .contract import DeployModel
from .official import LoadReport
from .weights import _read_state_dict

DFINE_CONFIGS = ("dfine_n", "dfine_s", "dfine_m", "dfine_l", "dfine_x")

_ENC_LAYER = {"linear1": "mlp.layers.0", "linear2": "mlp.layers.1", "norm1": "self_attn_layer_norm",
              "norm2": "final_layer_norm", "self_attn.out_proj": "self_attn.o_proj"}
_DEC_LAYER = {**_ENC_LAYER, "norm3": "final_layer_norm", "norm2": "encoder_attn_layer_norm", "cross_attn": "encoder_attn"}
_CSP = {"cv1": "conv1", "cv2.0": "csp_rep1", "cv2.1": "conv2", "cv3.0": "csp_rep2", "cv3.1": "conv3", "cv4": "conv4"}
_SEQ = {"conv": "0", "norm": "1", "proj": "0"}
_BACKBONE_MOD = {"conv": "convolution", "bn": "normalization", "lab": "lab"}

# (official key regex, transformers key template); the first full match wins. Groups named after a table
# above are renamed through it. The top-level ``class_embed`` / ``bbox_embed`` of transformers are the
# decoder's heads (tied), so each head tensor fills both names.
RULES: tuple[tuple[str, tuple[str, ...], dict[str, dict[str, str]]], ...] = (
    (r"backbone\.stem\.(?P<s>stem\w+)\.(?P<m>conv|bn|lab)\.(?P<p>\w+)", ("model.backbone.model.embedder.{s}.{m}.{p}",),
     {"m": _BACKBONE_MOD}),
    (r"backbone\.stages\.(?P<path>[\w.]*?)\.?(?P<m>conv|bn|lab)\.(?P<p>\w+)", ("model.backbone.model.encoder.stages.{path}.{m}.{p}",),
     {"m": _BACKBONE_MOD}),
    (r"encoder\.input_proj\.(?P<j>\d+)\.(?P<seq>conv|norm)\.(?P<p>\w+)", ("model.encoder_input_proj.{j}.{seq}.{p}",), {"seq": _SEQ}),
    (r"decoder\.input_proj\.(?P<j>\d+)\.(?P<seq>conv|norm)\.(?P<p>\w+)", ("model.decoder_input_proj.{j}.{seq}.{p}",), {"seq": _SEQ}),
    (r"encoder\.encoder\.(?P<i>\d+)\.layers\.(?P<l>\d+)\.self_attn\.in_proj_(?P<p>weight|bias)",
     ("model.encoder.aifi.{i}.layers.{l}.self_attn.{qkv}_proj.{p}",), {}),
    (r"encoder\.encoder\.(?P<i>\d+)\.layers\.(?P<l>\d+)\.(?P<sub>linear1|linear2|norm1|norm2|self_attn\.out_proj)\.(?P<p>\w+)",
     ("model.encoder.aifi.{i}.layers.{l}.{sub}.{p}",), {"sub": _ENC_LAYER}),
    (r"encoder\.lateral_convs\.(?P<rest>.+)", ("model.encoder.lateral_convs.{rest}",), {}),
    (r"encoder\.(?P<b>fpn|pan)_blocks\.(?P<i>\d+)\.(?P<csp>cv1|cv2\.0|cv2\.1|cv3\.0|cv3\.1|cv4)\.(?P<rest>.+)",
     ("model.encoder.{b}_blocks.{i}.{csp}.{rest}",), {"csp": _CSP}),
    (r"encoder\.downsample_convs\.(?P<i>\d+)\.0\.cv(?P<k>\d)\.(?P<rest>.+)", ("model.encoder.downsample_convs.{i}.conv{k}.{rest}",), {}),
    (r"decoder\.decoder\.layers\.(?P<l>\d+)\.self_attn\.in_proj_(?P<p>weight|bias)", ("model.decoder.layers.{l}.self_attn.{qkv}_proj.{p}",), {}),
    (r"decoder\.decoder\.layers\.(?P<l>\d+)\.(?P<sub>linear1|linear2|norm1|norm2|norm3|self_attn\.out_proj|cross_attn)\.(?P<rest>.+)",
     ("model.decoder.layers.{l}.{sub}.{rest}",), {"sub": _DEC_LAYER}),
    (r"decoder\.decoder\.layers\.(?P<l>\d+)\.gateway\.(?P<rest>.+)", ("model.decoder.layers.{l}.gateway.{rest}",), {}),
    (r"decoder\.decoder\.(?P<part>lqe_layers\..+|up|reg_scale)", ("model.decoder.{part}",), {}),
    (r"decoder\.dec_score_head\.(?P<rest>.+)", ("model.decoder.class_embed.{rest}", "class_embed.{rest}"), {}),
    (r"decoder\.dec_bbox_head\.(?P<rest>.+)", ("model.decoder.bbox_embed.{rest}", "bbox_embed.{rest}"), {}),
    (r"decoder\.(?P<part>pre_bbox_head|query_pos_head)\.(?P<rest>.+)", ("model.decoder.{part}.{rest}",), {}),
    (r"decoder\.(?P<part>denoising_class_embed|enc_score_head|enc_bbox_head)\.(?P<rest>.+)", ("model.{part}.{rest}",), {}),
    (r"decoder\.enc_output\.(?P<seq>proj|norm)\.(?P<p>\w+)", ("model.enc_output.{seq}.{p}",), {"seq": _SEQ}),
)
_COMPILED = tuple((re.compile(p), t, tables) for p, t, tables in RULES)  # see compile_rules

# By design not loaded: anchors (transformers computes them for the input size), the decoder's duplicate copies
# of ``up`` / ``reg_scale`` (its decoder holds them), and BatchNorm step counters where transformers has none.
IGNORED = (re.compile(r".*\.num_batches_tracked"), re.compile(r"decoder\.(anchors|valid_mask|up|reg_scale)"))


_SPLITS = {"{qkv}": ("qkv", ("q", "k", "v")), "{gu}": ("gu", ("gate", "up"))}  # fused tensors: split along dim 0


def compile_rules(rules) -> tuple:
    return tuple((re.compile(p), t, tables) for p, t, tables in rules)


def _targets(key: str, compiled: tuple = _COMPILED) -> tuple[list[str], bool] | None:
    """(transformers keys, whether the tensor is split among them along dim 0) of one official key."""
    for pattern, templates, tables in compiled:
        m = pattern.fullmatch(key)
        if m:
            groups = {k: tables[k][v] if k in tables else v for k, v in m.groupdict().items()}
            for marker, (field_name, parts) in _SPLITS.items():
                if marker in templates[0]:
                    return [templates[0].format(**{field_name: x}, **groups) for x in parts], True
            return [t.format(**groups) for t in templates], False
    return None


def dfine_key(key: str) -> list[str] | None:
    """The transformers key(s) of one official D-FINE key, or None if no rule matches."""
    found = _targets(key)
    return None if found is None else found[0]


def looks_dfine(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is an official D-FINE one: RT-DETR's names plus D-FINE's LQE and HGNetV2 stem."""
    return any(k.startswith("decoder.decoder.lqe_layers.") for k in state) and any(k.startswith("backbone.stem.") for k in state)


def plan_load(model: nn.Module, state: Mapping[str, torch.Tensor], config: str = "", *, compiled: tuple = _COMPILED,
              ignored: tuple = IGNORED) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Remap an official D-FINE state dict (or, with DEIMv2's ``compiled`` rules and ``ignored`` patterns, a DEIMv2
    one) onto ``model`` (transformers) and check every name and shape; loads nothing.

    Tied tensors (the top-level heads are the decoder's) count once; works on meta tensors.
    """
    target = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in target.items():
        groups.setdefault(id(tensor), []).append(name)
    report = LoadReport(config=config)
    fits: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        found = _targets(key, compiled)
        if found is None:
            (report.ignored if any(p.fullmatch(key) for p in ignored) else report.unexpected).append(key)
            continue
        targets, split = found
        parts = tensor.chunk(len(targets), dim=0) if split else (tensor,) * len(targets)
        for name, part in zip(targets, parts):
            if name not in target:
                (report.ignored if any(p.fullmatch(key) for p in ignored) else report.unexpected).append(key)
            elif tuple(part.shape) != tuple(target[name].shape):
                report.misshaped.append((name, tuple(part.shape), tuple(target[name].shape)))
            else:
                fits[name] = part
    head = fits.get("model.decoder.class_embed.0.weight", state.get("decoder.dec_score_head.0.weight"))
    report.num_classes = int(head.shape[0]) if head is not None else None
    report.unexpected = sorted(set(report.unexpected))
    report.ignored = sorted(set(report.ignored))
    report.missing = sorted(names[0] for names in groups.values() if not any(n in fits for n in names))
    report.loaded = len(groups) - len(report.missing)
    return fits, report


def infer_named_config(state: Mapping[str, torch.Tensor], configs: tuple[str, ...], family: str, *,
                       plan: Callable = plan_load, prepare: Callable[[nn.Module], nn.Module] = lambda m: m) -> str:
    """The one config of ``configs`` the checkpoint fits completely (each built on the meta device, ``prepare``d
    as the loader will prepare it); a refusal when none or several do. Shared by the D-FINE and DEIMv2 loaders."""
    meta = {k: v.to("meta") for k, v in state.items()}
    fitting = []
    for name in configs:
        with torch.device("meta"):
            model = prepare(build_model(name).model)
        if plan(model, meta, name)[1].complete:
            fitting.append(name)
    if len(fitting) != 1:
        why = "none of" if not fitting else f"several ({', '.join(fitting)}) of"
        raise CheckpointError(f"the weights fit {why} the {family} configs {', '.join(configs)}, so they cannot decide "
                              "the architecture; give config= (a name or a JSON path)")
    return fitting[0]


def infer_config(state: Mapping[str, torch.Tensor]) -> str:
    """The one named D-FINE config the checkpoint fits completely; a refusal when none or several do."""
    return infer_named_config(state, DFINE_CONFIGS, "D-FINE")


def read_official_state(path: str | Path | Mapping[str, torch.Tensor], name: str | None) -> tuple[Mapping[str, torch.Tensor], str]:
    """(state dict, how to name it in errors) of a checkpoint path (read with ``weights_only=True``) or a state dict."""
    state = path if isinstance(path, Mapping) else _read_state_dict(Path(path))
    return state, name or ("the state dict" if isinstance(path, Mapping) else str(path))


def load_official_family(state: Mapping[str, torch.Tensor], where: str, config: str | Path | None, allow_partial: bool, *,
                         family: str, model_type: str, prefix: str, infer: Callable, plan: Callable = plan_load,
                         prepare: Callable[[nn.Module], nn.Module] = lambda m: m) -> DeployModel:
    """The config (given, else ``infer``red from the shapes), the model built and ``prepare``d, the remapped tensors
    loaded and the :class:`LoadReport` attached; anything short of a complete load is an error unless ``allow_partial``."""
    try:
        cfg = load_config(config if config is not None else infer(state))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if cfg.model_type != model_type:
        raise ConfigError(f"{where}: config {cfg.name!r} is {cfg.model_type}, the checkpoint is {family} "
                          f"({family} configs: {', '.join(n for n in available_configs() if n.startswith(prefix))})")
    model = build_model(cfg)
    prepare(model.model)
    fits, report = plan(model.model, state, cfg.name)
    if not report.complete and not allow_partial:
        raise ConfigError(f"{where}: the checkpoint does not fit config {cfg.name!r} ({report.summary()})")
    with torch.no_grad():
        model.model.load_state_dict(fits, strict=False)
    model.load_report = report
    return model


def load_dfine_checkpoint(path: str | Path | Mapping[str, torch.Tensor], config: str | Path | None = None,
                          allow_partial: bool = False, *, name: str | None = None) -> DeployModel:
    """An official D-FINE checkpoint (``.pth``) as a DeployModel, with its :class:`LoadReport` as ``model.load_report``.

    The pickle is read with ``weights_only=True`` (a checkpoint holding arbitrary objects is refused). Without
    ``config`` the architecture is inferred from the shapes; anything short of a complete load is an error
    unless ``allow_partial``.
    """
    state, where = read_official_state(path, name)
    if not looks_dfine(state):
        raise CheckpointError(f"{where}: not an official D-FINE checkpoint (no decoder.decoder.lqe_layers.* / backbone.stem.* keys)")
    return load_official_family(state, where, config, allow_partial, family="D-FINE", model_type="d_fine", prefix="dfine_",
                                infer=infer_config)
