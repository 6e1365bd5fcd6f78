"""Official DEIMv2 checkpoints (Intellindust-AI-Lab/DEIMv2 ``.pth`` files) on transformers' ``Deimv2ForObjectDetection``.

An official checkpoint stores the training model's state dict (``model`` or ``ema.module``) with the official
module names. DEIMv2's decoder is D-FINE's with RMSNorm (``norm*.scale``), a SwiGLU FFN (``swish_ffn.w12``:
gate and up fused along dim 0) and, from N up, a gateway in place of the cross-attention norm; its encoder is a
LiteEncoder (Atto, Femto, Pico) or D-FINE's hybrid encoder; its backbone HGNetV2 (Atto..N) or DINOv3 with the
spatial tuning adapter (S..X). :data:`RULES` renames every official tensor onto transformers (same engine and
:class:`~toolkit.models.official.LoadReport` as :mod:`toolkit.models.official_dfine`), shape-checked.

transformers' ``Deimv2Model`` (5.x up to at least 5.25) differs structurally from the official code: it passes the
encoder memory through ``enc_output`` (Linear + LayerNorm) before the query selection, which the official
``DEIMTransformer`` does not have (it scores the memory itself, and takes the selected memory as the decoder's
content), uses ReLU in box heads the official configs give SiLU, and recomputes the query position embedding per
decoder layer; its DINOv3 backbone differs from the official ViT-Tiny (S, M) and DINOv3 ViT (L, X) as
:func:`_official_dinov3` says. :func:`official_structure` gives the model the official form, so that it computes
the official function (pinned by ``tests/test_official_deimv2.py`` against outputs recorded from the official
code). The config is inferred by fitting the checkpoint to each named DEIMv2 config: exactly one complete fit, or a
refusal that says the weights cannot decide.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
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
_VIT = r"backbone\.dinov3\.(?:_model\.)?"
_VIT_TOKENS = {"cls_token": "cls_token", "storage_tokens": "register_tokens"}
_VIT_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "ls1.gamma": "layer_scale1.lambda1",
              "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj",
              "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.up_proj", "mlp.w3": "mlp.down_proj"}

# (official key regex, transformers key templates, renaming tables); the first full match wins. ``{qkv}`` / ``{gu}``
# split a fused tensor along dim 0 (attention in_proj; SwiGLU w12 = [gate; up]); a head tensor fills both the
# decoder's and the top-level (tied) name.
RULES: tuple[tuple[str, tuple[str, ...], dict[str, dict[str, str]]], ...] = (
    # DINOv3 backbone (S..X): the official ViT-Tiny (S, M) nests its modules under ``_model``, the official DINOv3
    # ViT (L, X) does not; both land on transformers' DINOv3ViTBackbone
    (rf"{_VIT}(?P<t>cls_token|storage_tokens)", ("model.conv_encoder.backbone.embeddings.{t}",), {"t": _VIT_TOKENS}),
    (rf"{_VIT}patch_embed\.proj\.(?P<p>weight|bias)", ("model.conv_encoder.backbone.embeddings.patch_embeddings.{p}",), {}),
    (rf"{_VIT}blocks\.(?P<l>\d+)\.attn\.qkv\.(?P<p>weight|bias)", ("model.conv_encoder.backbone.model.layer.{l}.attention.{qkv}_proj.{p}",), {}),
    (rf"{_VIT}blocks\.(?P<l>\d+)\.(?P<sub>norm1|norm2|attn\.proj|ls1\.gamma|ls2\.gamma|mlp\.fc1|mlp\.fc2|mlp\.w1|mlp\.w2|mlp\.w3)"
     r"(?P<p>\.weight|\.bias|)", ("model.conv_encoder.backbone.model.layer.{l}.{sub}{p}",), {"sub": _VIT_BLOCK}),
    (rf"{_VIT}norm\.(?P<p>weight|bias)", ("model.conv_encoder.backbone.norm.{p}",), {}),
    # the spatial tuning adapter (STA) and the fusion of its maps with the ViT's
    # (official Sequentials: stem and conv2 are [conv, BN, ...], conv3 and conv4 [GELU, conv, BN])
    (r"backbone\.sta\.(?P<m>stem|conv2)\.(?P<i>[01])\.(?P<p>\w+)", ("model.conv_encoder.spatial_tuning_adapter.{m}.{i}.{p}",),
     {"m": {"stem": "stem_conv", "conv2": "conv2"}, "i": {"0": "conv", "1": "norm"}}),
    (r"backbone\.sta\.(?P<m>conv3|conv4)\.(?P<i>[12])\.(?P<p>\w+)", ("model.conv_encoder.spatial_tuning_adapter.{m}.{i}.{p}",),
     {"i": {"1": "conv", "2": "norm"}}),
    (r"backbone\.convs\.(?P<j>\d+)\.weight", ("model.conv_encoder.fusion_proj.{j}.conv.weight",), {}),
    (r"backbone\.norms\.(?P<j>\d+)\.(?P<p>\w+)", ("model.conv_encoder.fusion_proj.{j}.norm.{p}",), {}),
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
# DINOv3 backbones: the RoPE periods (transformers computes them from ``rope_theta``; the loader checks they are
# those), the masked-pretraining ``mask_token`` (unused by detection; checked finite, as the official model adds
# 0 * mask_token to the class token) and the key-bias mask (folded into the qkv bias: :func:`_fold_bias_mask`).
IGNORED = (re.compile(r".*\.num_batches_tracked"), re.compile(r"decoder\.(anchors|valid_mask|up|reg_scale)"),
           re.compile(rf"{_VIT}(rope_embed\.periods|mask_token|blocks\.\d+\.attn\.qkv\.bias_mask)"))


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
      :func:`_first_query_pos`;
    * a DINOv3 backbone (S..X) takes the official backbone's form: :func:`_official_dinov3`.
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
    backbone = getattr(getattr(inner, "conv_encoder", None), "backbone", None)
    if type(backbone).__name__ == "DINOv3ViTBackbone":
        _official_dinov3(backbone)
    return model


def _official_dinov3(backbone: nn.Module) -> None:
    """transformers' ``DINOv3ViTBackbone`` in the form of the official DEIMv2 backbone, in place.

    Both official backbones: ``mask_token`` (masked pretraining only) leaves the state dict; a SwiGLU FFN (X) uses
    SiLU, as the official ``SwiGLUFFN`` (transformers' gated MLP takes ``hidden_act``, GELU by default). The official
    ViT-Tiny (S, M; ``apply_layernorm`` False in transformers' config) also differs from transformers' DINOv3 ViT:
    no norm on any feature map (transformers norms the last stage whatever ``apply_layernorm`` says), no layer
    scale, no register tokens, LayerNorm eps 1e-6, and a key bias (its qkv Linear has one bias for q, k and v).
    """
    config = backbone.config
    emb = backbone.embeddings
    _unregister(emb, "mask_token")
    if config.use_gated_mlp:
        for layer in backbone.model.layer:
            layer.mlp.act_fn = nn.SiLU()
    if config.apply_layernorm:
        return
    if config.num_register_tokens or config.use_gated_mlp:
        raise ConfigError("a DINOv3 DEIMv2 config without apply_layernorm is the official ViT-Tiny backbone, which has no "
                          "register tokens and no gated MLP: this config matches no official DEIMv2 backbone")
    _unregister(emb, "register_tokens")
    backbone.norm = nn.Identity()
    for layer in backbone.model.layer:
        layer.layer_scale1 = nn.Identity()
        layer.layer_scale2 = nn.Identity()
        layer.norm1.eps = layer.norm2.eps = 1e-6
        k_proj = layer.attention.k_proj
        if k_proj.bias is None:
            k_proj.bias = nn.Parameter(torch.zeros(k_proj.out_features, dtype=k_proj.weight.dtype, device=k_proj.weight.device))


def _unregister(module: nn.Module, name: str) -> None:
    """``module.<name>`` from a parameter to a non-persistent buffer (same value; out of the state dict)."""
    value = getattr(module, name)
    if isinstance(value, nn.Parameter):
        delattr(module, name)
        module.register_buffer(name, value.detach().clone(), persistent=False)


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
    state = _fold_bias_mask(state)
    _check_dinov3_values(model, state)
    # a key with several candidates (the encoder's input_proj) fills the one the model has
    fits, report = _plan_load(model, state, config, compiled=_COMPILED, ignored=IGNORED)
    report.unexpected = sorted(k for k in report.unexpected if not _fills_one(k, target))
    return fits, report


def _fold_bias_mask(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The official DINOv3 ViT (L, X) computes its qkv Linear with ``bias * bias_mask`` (the mask zeroes the key bias
    in DINOv3's pretrained weights): the state with each such bias replaced by that product (the mask stays, ignored)."""
    masks = {k.removesuffix("_mask"): v for k, v in state.items() if k.startswith("backbone.dinov3.") and k.endswith(".attn.qkv.bias_mask")}
    if not masks:
        return state
    for key, mask in masks.items():
        if not mask.is_meta and not torch.isfinite(mask).all():
            raise CheckpointError(f"{key}_mask is not finite (the official code leaves it NaN unless pretrained DINOv3 weights "
                                  "were loaded): the official model computes NaN with it")
    return {k: v * masks[k].to(v.dtype) if k in masks and v.shape == masks[k].shape else v for k, v in state.items()}


def _check_dinov3_values(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """The DINOv3 tensors the loader does not load but computes from the config must be what the config says: the
    RoPE periods (1 / inv_freq of ``rope_theta``) and a finite ``mask_token``. Skipped on meta tensors."""
    rope = next((m for m in model.modules() if type(m).__name__ == "DINOv3ViTRopePositionEmbedding"), None)
    for key, value in state.items():
        if not key.startswith("backbone.dinov3.") or value.is_meta:
            continue
        if key.endswith("rope_embed.periods") and rope is not None and not rope.inv_freq.is_meta:
            want = 1.0 / rope.inv_freq.double()
            if value.shape != want.shape or not torch.allclose(value.double(), want, rtol=1e-5, atol=0):
                raise CheckpointError(f"{key}: RoPE periods other than those of rope_theta={rope.base} (head dim {rope.head_dim}), "
                                      "which the model computes its position embedding with")
        elif key.endswith("mask_token") and not torch.isfinite(value).all():
            raise CheckpointError(f"{key} is not finite: the official model adds 0 * mask_token to the class token (NaN)")


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
    try:
        return load_official_family(state, where, config, allow_partial, family="DEIMv2", model_type="deimv2", prefix="deimv2_",
                                    infer=infer_config, plan=plan_load, prepare=official_structure)
    except CheckpointError as e:  # the value checks of plan_load name the tensor, not the file
        if str(e).startswith(f"{where}: "):
            raise
        raise CheckpointError(f"{where}: {e}") from None
