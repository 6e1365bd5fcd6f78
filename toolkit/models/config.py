"""Named model configs (``configs/NAME.json``) and building transformers detectors from them.

The implementations are transformers' (``RTDetrForObjectDetection``, ``DFineForObjectDetection``, ...); which
``model_type`` maps to which classes, and what each family needs beyond them, is the family registry's
(:mod:`toolkit.models.families`).
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
from .families import family_for, model_types, transformers_classes

CONFIG_DIR = Path(os.environ.get("RTDETR_DEPLOY_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


DEPLOY_FILE = "deploy.json"  # written beside a saved HF checkpoint: preprocessing, top-K, config name


_MODEL_TYPES = {mt: fam.model_types[mt] for mt, fam in model_types().items()}  # model_type -> class prefix


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
    tie_free: bool = False  # generated weights get make_tie_free_ (see build_model); true where that stays finite
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


_transformers_classes = transformers_classes


def hf_config(cfg: ModelConfig) -> Any:
    config_cls, _ = _transformers_classes(cfg.model_type)
    values = dict(cfg.hf_config)
    values["id2label"] = dict(enumerate(cfg.class_names))
    values["label2id"] = {n: i for i, n in enumerate(cfg.class_names)}
    values.setdefault("use_pretrained_backbone", False)
    values.setdefault("anchor_image_size", list(cfg.input_size))
    return config_cls(**values)


CONFIG_SEED = 0  # the documented seed of a config name's generated weights (see build_model)


def build_model(config: str | Path | ModelConfig, *, seed: int | None = None, tie_free: bool | None = None) -> DeployModel:
    """A model from a named config with generated (untrained) weights, identical in every process.

    With ``seed=None`` (what a bare config name gets: ``toolkit.compare("m.onnx", "tiny")``,
    ``rtdetr-deploy export --config tiny``): transformers' initialisation under torch seed
    :data:`CONFIG_SEED` (0), then, for configs marked ``"tie_free": true`` (``tiny``), :func:`make_tie_free_`
    with the same seed. transformers' initialisation alone leaves the encoder's query selection tied, so two
    correct backends pick different queries and a compare of such weights is inconclusive; the perturbation
    makes the outputs comparable. On the large configs (R18 and up) the same perturbation overflows to NaN
    or saturates every score, so their generated weights stay the plain seeded initialisation (speed
    measurements are fine on them; compares are not). An explicit ``seed`` gives the plain initialisation
    under that seed unless ``tie_free=True``. The caller's torch RNG state is left as it was. The model is
    labelled as random weights (:attr:`DeployModel.random_weights`) until its weights change.
    """
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    _, model_cls = _transformers_classes(cfg.model_type)
    tie_free = (seed is None and cfg.tie_free) if tie_free is None else tie_free
    seed = CONFIG_SEED if seed is None else seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(hf_config(cfg)).eval()
    deploy = _wrap_hf(model, cfg)
    if tie_free:
        make_tie_free_(deploy, seed=seed)
    deploy.mark_random_weights(f"config {cfg.name}, seed {seed}" + (", make_tie_free_" if tie_free else ", transformers initialisation"))
    return deploy


def _wrap_hf(model: nn.Module, cfg: ModelConfig) -> DeployModel:
    q, c = model.config.num_queries, model.config.num_labels
    if cfg.top_k > q * c:
        raise ConfigError(f"config {cfg.name}: top_k={cfg.top_k} exceeds queries x classes = {q}x{c}")
    normalize = family_for(model.config.model_type).normalization(model.config)
    return DeployModel(model, class_names=cfg.class_names, preprocess=cfg.preprocess, top_k=cfg.top_k, name=cfg.name,
                       normalize=normalize)


def make_tie_free_(model: DeployModel, seed: int = 0, std: float = 0.3) -> DeployModel:
    """Perturb every floating parameter with seeded noise so that no two query scores tie.

    transformers' default initialisation makes the encoder's class scores nearly constant, so its
    top-K query selection is an exact tie that two correct backends break differently. Test models
    use this to get weights whose outputs can be compared; trained weights need nothing of the kind.
    """
    generated = model.random_weights if isinstance(model, DeployModel) else None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * std)
    if generated:  # still generated weights: keep the label, saying how
        model.mark_random_weights(f"{generated}, make_tie_free_(seed={seed}, std={std})")
    return model
