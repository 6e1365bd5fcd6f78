"""The RT-DETR deploy contract as a torch module.

Inputs ``images`` float32 [N,3,H,W] and ``orig_target_sizes`` [N,2] as (w, h); outputs ``labels`` int64
[N,K], ``boxes`` float32 [N,K,4] xyxy in original-image pixels and ``scores`` float32 [N,K]: sigmoid
scores, top-K over queries x classes, boxes scaled by the sizes, as the official RT-DETR postprocessor
does in its deploy mode. :class:`DeployModel` wraps any model that returns raw predictions and carries
the class names and preprocessing with it; a network that expects normalized input (DEIMv2's DINOv3
backbones: ImageNet mean/std) is normalized inside the wrapper, so ``images`` stay in [0, 1] for every family.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..signature import PreprocessSpec, Signature, deploy_signature

_LOGIT_KEYS = ("pred_logits", "logits")  # official naming, transformers naming


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (names and raw bytes): identifies the weights an artifact was made from."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def raw_predictions(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N,Q,C], boxes [N,Q,4] normalized cxcywh) from a dict or an output object, either naming."""
    get = output.get if isinstance(output, dict) else (lambda k: getattr(output, k, None))
    logits = next((v for v in (get(k) for k in _LOGIT_KEYS) if v is not None), None)
    boxes = get("pred_boxes")
    if logits is None or boxes is None:
        raise ConfigError(
            f"the model returned {type(output).__name__} without pred_logits/logits and pred_boxes; "
            "wrap a model that returns raw RT-DETR predictions, or one that implements the deploy contract"
        )
    return logits, boxes


def postprocess(
    logits: torch.Tensor, boxes_cxcywh: torch.Tensor, orig_target_sizes: torch.Tensor, top_k: int, preprocess: PreprocessSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid, top-K over queries x classes, cxcywh -> xyxy, scaled to original pixels (undoing a letterbox)."""
    from torchvision.ops import box_convert

    num_classes = logits.shape[-1]
    sizes = orig_target_sizes.to(torch.float32)  # (w, h) of each original image
    boxes = box_convert(boxes_cxcywh.float(), in_fmt="cxcywh", out_fmt="xyxy")
    if preprocess.resize == "stretch":
        boxes = boxes * sizes.repeat(1, 2).unsqueeze(1)
    else:
        in_h, in_w = preprocess.size
        scale = torch.minimum(in_w / sizes[:, 0], in_h / sizes[:, 1])  # [N]
        pad = torch.stack([torch.floor((in_w - torch.round(sizes[:, 0] * scale)) / 2),
                           torch.floor((in_h - torch.round(sizes[:, 1] * scale)) / 2)], dim=-1)  # [N,2]
        in_size = torch.tensor([in_w, in_h], dtype=torch.float32, device=boxes.device)
        boxes = (boxes * in_size.repeat(2) - pad.repeat(1, 2).unsqueeze(1)) / scale[:, None, None]
    scores = torch.sigmoid(logits.float()).flatten(1)
    scores, index = torch.topk(scores, top_k, dim=-1)
    labels = index % num_classes
    query = index // num_classes
    boxes = boxes.gather(dim=1, index=query.unsqueeze(-1).expand(-1, -1, 4))
    return labels, boxes, scores


class DeployModel(nn.Module):
    """A detector behind the deploy contract, with its class names and preprocessing.

    ``model`` either returns raw predictions (dict or output object, official or transformers naming)
    and is post-processed here, or already implements the contract (``contract=True``) and is called as is.
    ``normalize``: (mean, std) per channel applied to ``images`` before a raw-predictions model (recorded in
    ``preprocess.in_model_normalization``, so consumers know not to normalize again).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        class_names: Sequence[str],
        preprocess: PreprocessSpec,
        top_k: int = 300,
        contract: bool = False,
        name: str = "custom",
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.class_names = list(class_names)
        normalize = normalize if normalize is not None else preprocess.in_model_normalization
        if normalize is not None:
            if contract:
                raise ConfigError("normalize applies to raw-predictions models; a contract model normalizes itself")
            mean, std = (tuple(float(v) for v in part) for part in normalize)
            self.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
            preprocess = replace(preprocess, in_model_normalization=(mean, std))
        self.preprocess = preprocess
        self.top_k = int(top_k)
        self.contract = contract
        self.name = name
        self._generated: tuple[str, str | None] | None = None  # (label, weights sha256) of generated weights

    def mark_random_weights(self, label: str) -> None:
        """Record that the current weights are generated, not trained (``label`` says how, e.g. the seed)."""
        on_meta = any(t.is_meta for t in self.state_dict().values())  # built without data (parameter counts): no hash
        self._generated = (label, None if on_meta else weights_sha256(self))

    @property
    def random_weights(self) -> str | None:
        """How the weights were generated when they are random (untrained) weights, else None.

        Checked against the weights hash, so loading a checkpoint or training the model clears it: every
        artifact made from this model (ONNX metadata, sidecars, compare reports) says when its boxes come
        from random weights and so say nothing about accuracy.
        """
        if self._generated is None:
            return None
        label, digest = self._generated
        return label if digest is None or weights_sha256(self) == digest else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def signature(self, sizes_dtype: str = "int64") -> Signature:
        return deploy_signature(self.preprocess, sizes_dtype=sizes_dtype, top_k=self.top_k)

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (logits, normalized cxcywh boxes) before the postprocess; only for models that return them."""
        if self.contract:
            raise ConfigError("this model implements the deploy contract itself; its raw predictions are not reachable")
        if self.preprocess.in_model_normalization is not None:
            images = (images - self.input_mean) / self.input_std
        return raw_predictions(self.model(images))

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.contract:
            out = self.model(images, orig_target_sizes)
            if isinstance(out, dict):
                out = (out["labels"], out["boxes"], out["scores"])
            labels, boxes, scores = out
            return labels.to(torch.int64), boxes.to(torch.float32), scores.to(torch.float32)
        logits, boxes = self.raw(images)
        k = min(self.top_k, logits.shape[1] * logits.shape[2])
        return postprocess(logits, boxes, orig_target_sizes, k, self.preprocess)


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ReducedPrecision(nn.Module):
    """The deploy model with its network body in ``dtype``: images are cast on the way in, while the
    postprocess (sigmoid, top-K, box scaling) stays fp32 (it casts logits and boxes up first).
    I/O dtypes are those of the fp32 contract, so every backend compares at the same interface."""

    def __init__(self, deploy: DeployModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.deploy = deploy.to(dtype)
        self.dtype = dtype

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.deploy(images.to(self.dtype), orig_target_sizes)
