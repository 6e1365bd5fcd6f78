"""Named model configs (``configs/NAME.json``) and building transformers RT-DETR models from them.

The RT-DETR implementation is transformers' (``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..signature import PreprocessSpec
from .contract import DeployModel

CONFIG_DIR = Path(os.environ.get("RTDETR_DEPLOY_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


DEPLOY_FILE = "deploy.json"  # written beside a saved HF checkpoint: preprocessing, top-K, config name


_MODEL_TYPES = {"rt_detr": "RTDetr", "rt_detr_v2": "RTDetrV2"}


@dataclass
class ModelConfig:
    """A named model: transformers config values plus what the deploy contract needs."""

    name: str
    model_type: str = "rt_detr"
    input_size: tuple[int, int] = (640, 640)
    top_k: int = 300
    class_names: list[str] = field(default_factory=list)
    hf_config: dict[str, Any] = field(default_factory=dict)
    resize: str = "stretch"
    description: str = ""
    # The official lyuwenyu/RT-DETR model this config deploys, where it differs from what the transformers model
    # computes: ``yaml`` (the official config's name), ``decoder_layers`` and ``eval_idx`` (an official model
    # trained with more decoder layers than it evaluates: the transformers model is built with eval_idx + 1).
    official: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec(size=tuple(self.input_size), resize=self.resize)


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> ModelConfig:
    """A config by name (``configs/NAME.json``) or by path to such a JSON file."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"unknown config {str(name_or_path)!r}; known configs: {', '.join(available_configs())}")
    try:
        data = json.loads(path.read_text())
        data.setdefault("name", path.stem)
        cfg = ModelConfig(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"config {path}: {e}") from None
    if cfg.model_type not in _MODEL_TYPES:
        raise ConfigError(f"config {path}: model_type must be one of {', '.join(_MODEL_TYPES)}, got {cfg.model_type!r}")
    if not cfg.class_names:
        raise ConfigError(f"config {path}: class_names is empty")
    return cfg


def _transformers_classes(model_type: str) -> tuple[type, type]:
    import transformers

    prefix = _MODEL_TYPES[model_type]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForObjectDetection")


def hf_config(cfg: ModelConfig) -> Any:
    config_cls, _ = _transformers_classes(cfg.model_type)
    values = dict(cfg.hf_config)
    values["id2label"] = dict(enumerate(cfg.class_names))
    values["label2id"] = {n: i for i, n in enumerate(cfg.class_names)}
    values.setdefault("use_pretrained_backbone", False)
    values.setdefault("anchor_image_size", list(cfg.input_size))
    return config_cls(**values)


def build_model(config: str | Path | ModelConfig, *, seed: int | None = None) -> DeployModel:
    """A randomly initialised model from a named config (``seed`` makes the weights reproducible)."""
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    _, model_cls = _transformers_classes(cfg.model_type)
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(hf_config(cfg)).eval()
    return _wrap_hf(model, cfg)


def _wrap_hf(model: nn.Module, cfg: ModelConfig) -> DeployModel:
    q, c = model.config.num_queries, model.config.num_labels
    if cfg.top_k > q * c:
        raise ConfigError(f"config {cfg.name}: top_k={cfg.top_k} exceeds queries x classes = {q}x{c}")
    return DeployModel(model, class_names=cfg.class_names, preprocess=cfg.preprocess, top_k=cfg.top_k, name=cfg.name)


def make_tie_free_(model: DeployModel, seed: int = 0, std: float = 0.3) -> DeployModel:
    """Perturb every floating parameter with seeded noise so that no two query scores tie.

    transformers' default initialisation makes the encoder's class scores nearly constant, so its
    top-K query selection is an exact tie that two correct backends break differently. Test models
    use this to get weights whose outputs can be compared; trained weights need nothing of the kind.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * std)
    return model
