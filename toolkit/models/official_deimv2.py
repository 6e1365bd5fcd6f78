"""Official DEIMv2 checkpoints (Intellindust-AI-Lab/DEIMv2 ``.pth`` files) on transformers' ``Deimv2ForObjectDetection``.

An official checkpoint stores the training model's state dict (``model`` or ``ema.module``) with the official
module names. DEIMv2's decoder is D-FINE's with RMSNorm (``norm*.scale``), a SwiGLU FFN (``swish_ffn.w12``:
gate and up fused along dim 0) and, from N up, a gateway in place of the cross-attention norm; its encoder is a
LiteEncoder (Atto, Femto, Pico) or D-FINE's hybrid encoder; its backbone HGNetV2 (Atto..N) or DINOv3 with the
spatial tuning adapter (S..X). :data:`RULES` renames every official tensor onto transformers (same engine and
:class:`~toolkit.models.official.LoadReport` as :mod:`toolkit.models.official_dfine`), shape-checked.

One structural difference: transformers' ``Deimv2Model`` (5.x up to at least 5.25) passes the encoder memory
through ``enc_output`` (Linear + LayerNorm) before the query selection, which the official ``DEIMTransformer``
does not have (it scores the memory itself, and takes the selected memory as the decoder's content). An official
checkpoint has no tensors for it, so :func:`official_structure` replaces it by an identity: the model then
computes the official function (pinned by ``tests/test_official_deimv2.py`` against outputs recorded from the
official code). The config is inferred by fitting the checkpoint to each named DEIMv2 config: exactly one
complete fit, or a refusal that says the weights cannot decide.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .contract import DeployModel
from .official import LoadReport
from .official_dfine import compile_rules, infer_named_config, load_official_family, plan_load as _plan_load, read_official_state

DEIMV2_CONFIGS = ("deimv2_atto", "deimv2_femto", "deimv2_pico", "deimv2_n", "deimv2_s", "deimv2_m", "deimv2_l", "deimv2_x")

_BACKBONE_MOD = {"conv": "convolution", "bn": "normalization", "lab": "lab"}
_CSP = {"cv1": "conv1", "cv2.0": "csp_rep1", "cv2.1": "csp_rep1.conv2", "cv3.0": "csp_rep2", "cv3.1": "csp_rep2.conv2", "cv4": "conv2"}
_DEC = {"self_attn.out_proj": "self_attn.o_proj", "cross_attn": "encoder_attn", "swish_ffn.w3": "mlp.down_proj", "gateway.gate": "gateway.gate"}
_NORM = {"norm1": "self_attn_layer_norm", "norm2": "encoder_attn_layer_norm", "norm3": "final_layer_norm", "gateway.norm": "gateway.norm"}
_ENC_LAYER = {"linear1": "mlp.layers.0", "linear2": "mlp.layers.1", "norm1": "self_attn_layer_norm", "norm2": "final_layer_norm",
              "self_attn.out_proj": "self_attn.o_proj"}
_SEQ = {"1": "conv", "2": "norm"}
_HEAD = r"(?P<csp>cv1|cv2\.0|cv2\.1|cv3\.0|cv3\.1|cv4)"

# (official key regex, transformers key templates, renaming tables); the first full match wins. ``{qkv}`` / ``{gu}``
# split a fused tensor along dim 0 (attention in_proj; SwiGLU w12 = [gate; up]); a head tensor fills both the
# decoder's and the top-level (tied) name.
RULES: tuple[tuple[str, tuple[str, ...], dict[str, dict[str, str]]], ...] = (
    # HGNetV2 backbone
    (r"backbone\.stem\.(?P<s>stem\w+)\.(?P<m>conv|bn|lab)\.(?P<p>\w+)", ("model.conv_encoder.model.embedder.{s}.{m}.{p}",),
     {"m": _BACKBONE_MOD}),
    (r"backbone\.stages\.(?P<path>[\w.]*?)\.?(?P<m>conv|bn|lab)\.(?P<p>\w+)", ("model.conv_encoder.model.encoder.stages.{path}.{m}.{p}",),
     {"m": _BACKBONE_MOD}),
    # LiteEncoder (Atto, Femto, Pico)
    (r"encoder\.down_sample(?P<k>\d)\.(?P<i>[12])\.(?P<p>\w+)", ("model.encoder.down_conv{k}.{i}.{p}",), {"i": _SEQ}),
    (r"encoder\.bi_fusion\.cv\.(?P<rest>.+)", ("model.encoder.bi_fusion_conv.{rest}",), {}),
    (rf"encoder\.(?P<b>fpn|pan)_block\.{_HEAD}\.(?P<rest>.+)", ("model.encoder.{b}_block.{csp}.{rest}",), {"csp": _CSP}),
    # hybrid encoder (N; S..X)
    (r"encoder\.encoder\.(?P<i>\d+)\.layers\.(?P<l>\d+)\.self_attn\.in_proj_(?P<p>weight|bias)",
     ("model.encoder.aifi.{i}.layers.{l}.self_attn.{qkv}_proj.{p}",), {}),
    (r"encoder\.encoder\.(?P<i>\d+)\.layers\.(?P<l>\d+)\.(?P<sub>linear1|linear2|norm1|norm2|self_attn\.out_proj)\.(?P<p>\w+)",
     ("model.encoder.aifi.{i}.layers.{l}.{sub}.{p}",), {"sub": _ENC_LAYER}),
    (r"encoder\.lateral_convs\.(?P<rest>.+)", ("model.encoder.lateral_convs.{rest}",), {}),
    (rf"encoder\.(?P<b>fpn|pan)_blocks\.(?P<i>\d+)\.{_HEAD}\.(?P<rest>.+)", ("model.encoder.{b}_blocks.{i}.{csp}.{rest}",), {"csp": _CSP}),
    (r"encoder\.downsample_convs\.(?P<i>\d+)\.0\.cv(?P<k>\d)\.(?P<rest>.+)", ("model.encoder.downsample_convs.{i}.conv{k}.{rest}",), {}),
    # the encoder's input projection: the LiteEncoder's own, the hybrid encoder's in transformers' conv encoder
    (r"encoder\.input_proj\.(?P<rest>.+)", ("model.encoder.input_proj.{rest}", "model.conv_encoder.encoder_input_proj.{rest}"), {}),
    # decoder
    (r"decoder\.decoder\.layers\.(?P<l>\d+)\.self_attn\.in_proj_(?P<p>weight|bias)", ("model.decoder.layers.{l}.self_attn.{qkv}_proj.{p}",), {}),
    (r"decoder\.decoder\.layers\.(?P<l>\d+)\.swish_ffn\.w12\.(?P<p>weight|bias)", ("model.decoder.layers.{l}.mlp.{gu}_proj.{p}",), {}),
    (r"decoder\.decoder\.layers\.(?P<l>\d+)\.(?P<sub>self_attn\.out_proj|cross_attn|swish_ffn\.w3|gateway\.gate)\.(?P<rest>.+)",
     ("model.decoder.layers.{l}.{sub}.{rest}",), {"sub": _DEC}),
    (r"decoder\.decoder\.layers\.(?P<l>\d+)\.(?P<n>norm1|norm2|norm3|gateway\.norm)\.scale", ("model.decoder.layers.{l}.{n}.weight",), {"n": _NORM}),
    (r"decoder\.decoder\.(?P<part>lqe_layers\..+|up|reg_scale)", ("model.decoder.{part}",), {}),
    (r"decoder\.dec_score_head\.(?P<rest>.+)", ("model.decoder.class_embed.{rest}", "class_embed.{rest}"), {}),
    (r"decoder\.dec_bbox_head\.(?P<rest>.+)", ("model.decoder.bbox_embed.{rest}", "bbox_embed.{rest}"), {}),
    (r"decoder\.(?P<part>pre_bbox_head|query_pos_head)\.(?P<rest>.+)", ("model.decoder.{part}.{rest}",), {}),
    (r"decoder\.(?P<part>denoising_class_embed|enc_score_head|enc_bbox_head)\.(?P<rest>.+)", ("model.{part}.{rest}",), {}),
    (r"decoder\.input_proj\.(?P<j>\d+)\.(?P<seq>conv|norm)\.(?P<p>\w+)", ("model.decoder_input_proj.{j}.{seq}.{p}",),
     {"seq": {"conv": "0", "norm": "1"}}),
)
_COMPILED = compile_rules(RULES)

# By design not loaded: anchors (transformers computes them for the input size), the decoder's duplicate copies
# of ``up`` / ``reg_scale`` (its decoder holds them), and BatchNorm step counters where transformers has none.
IGNORED = (re.compile(r".*\.num_batches_tracked"), re.compile(r"decoder\.(anchors|valid_mask|up|reg_scale)"))


def deimv2_key(key: str) -> list[str] | None:
    """The transformers key candidates of one official DEIMv2 key, or None if no rule matches."""
    from .official_dfine import _targets

    found = _targets(key, _COMPILED)
    return None if found is None else found[0]


def looks_deimv2(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is an official DEIMv2 one: D-FINE's LQE layers plus DEIMv2's SwiGLU decoder FFN."""
    return (any(k.startswith("decoder.decoder.lqe_layers.") for k in state)
            and any(".swish_ffn.w12." in k for k in state if k.startswith("decoder.decoder.layers.")))


def official_structure(model: nn.Module) -> nn.Module:
    """``model`` (a ``Deimv2ForObjectDetection``) with the official DEIMv2 structure, in place; returns ``model``.

    * ``enc_output`` (absent from the official decoder) becomes an identity;
    * the decoder's box MLPs (``enc_bbox_head``, ``pre_bbox_head``, the ``bbox_embed`` heads) take the official
      ``mlp_act`` and the LQE's ``reg_conf`` the official decoder ``activation``, where transformers hard-codes ReLU
      (the official DEIMv2 configs set both to SiLU; transformers' config carries them as
      ``decoder_activation_function`` / ``activation_function``, which its ``query_pos_head`` already uses);
    * the query position embedding is computed once, from the selected queries' boxes, and reused by every decoder
      layer, as the official decoder does (transformers recomputes it per layer from the refined boxes, D-FINE's way):
      :func:`_first_query_pos`.
    """
    from transformers.activations import ACT2CLS

    model._toolkit_official_structure = "DEIMv2"  # save_model refuses it: a HF directory cannot carry this structure
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "enc_output", None), nn.Sequential):
        inner.enc_output = nn.Identity()
    config = model.config
    for name, module in model.named_modules():
        if type(module).__name__ != "Deimv2MLP" or not hasattr(module, "act"):
            continue
        if re.search(r"(^|\.)(enc_bbox_head|pre_bbox_head|bbox_embed\.\d+)$", name):
            module.act = ACT2CLS[getattr(config, "decoder_activation_function", "silu")]()
        elif re.search(r"lqe_layers\.\d+\.reg_conf$", name):
            module.act = ACT2CLS[getattr(config, "activation_function", "silu")]()
    decoder = getattr(inner, "decoder", None)
    if decoder is not None and hasattr(decoder, "query_pos_head") and "forward" not in decoder.__dict__:
        _first_query_pos(decoder)
    return model


def _first_query_pos(decoder: nn.Module) -> None:
    """Within one ``decoder`` forward, ``decoder.query_pos_head`` answers every call with its first result.

    Bound to the instances (state-dict names unchanged; a deep copy rebinds to the copy); the first result is
    dropped when the forward ends.
    """
    decoder.query_pos_head._official_first = None
    decoder.query_pos_head.forward = types.MethodType(_query_pos_first_only, decoder.query_pos_head)
    decoder.forward = types.MethodType(_decoder_forward, decoder)


def _query_pos_first_only(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if self._official_first is None:
        self._official_first = type(self).forward(self, x)
    return self._official_first


def _decoder_forward(self: nn.Module, *args, **kwargs):
    self.query_pos_head._official_first = None
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        self.query_pos_head._official_first = None


def plan_load(model: nn.Module, state: Mapping[str, torch.Tensor], config: str = "") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Remap an official DEIMv2 state dict onto ``model`` (transformers, :func:`official_structure` applied) and
    check every name and shape; loads nothing. Each official tensor must fill one of its candidate names."""
    target = model.state_dict(keep_vars=True)
    # a key with several candidates (the encoder's input_proj) fills the one the model has
    fits, report = _plan_load(model, state, config, compiled=_COMPILED, ignored=IGNORED)
    report.unexpected = sorted(k for k in report.unexpected if not _fills_one(k, target))
    return fits, report


def _fills_one(key: str, target: Mapping[str, torch.Tensor]) -> bool:
    names = deimv2_key(key) or []
    return key.startswith("encoder.input_proj.") and any(n in target for n in names)


def infer_config(state: Mapping[str, torch.Tensor]) -> str:
    """The one named DEIMv2 config the checkpoint fits completely; a refusal when none or several do."""
    return infer_named_config(state, DEIMV2_CONFIGS, "DEIMv2", plan=plan_load, prepare=official_structure)


def load_deimv2_checkpoint(path: str | Path | Mapping[str, torch.Tensor], config: str | Path | None = None,
                           allow_partial: bool = False, *, name: str | None = None) -> DeployModel:
    """An official DEIMv2 checkpoint (``.pth``) as a DeployModel, with its :class:`LoadReport` as ``model.load_report``.

    The pickle is read with ``weights_only=True``. Without ``config`` the architecture is inferred from the shapes;
    anything short of a complete load is an error unless ``allow_partial``.
    """
    state, where = read_official_state(path, name)
    if not looks_deimv2(state):
        raise CheckpointError(f"{where}: not an official DEIMv2 checkpoint (no decoder.decoder.lqe_layers.* / *.swish_ffn.w12.* keys)")
    if any(k.startswith("backbone.dinov3.") for k in state):
        raise CheckpointError(f"{where}: an official DEIMv2 DINOv3 checkpoint (S/M/L/X); only the HGNetV2 ones (Atto, Femto, Pico, N) "
                              "are remapped: convert it to a Hugging Face directory with transformers' DEIMv2 converter and load that")
    return load_official_family(state, where, config, allow_partial, family="DEIMv2", model_type="deimv2", prefix="deimv2_",
                                infer=infer_config, plan=plan_load, prepare=official_structure)
