"""Models: named configs in ``configs/``, Hugging Face checkpoint directories, weight files, user modules.

Everything ends up as a :class:`~toolkit.contract.DeployModel`: the detector behind the deploy
contract, with its class names and preprocessing. The RT-DETR implementation is transformers'
(``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .contract import DeployModel, raw_predictions
from .errors import CheckpointError, ConfigError
from .signature import PreprocessSpec

CONFIG_DIR = Path(os.environ.get("RTDETR_DEPLOY_CONFIGS", Path(__file__).resolve().parent.parent / "configs"))
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


def save_model(model: DeployModel, directory: str | Path) -> Path:
    """Save a transformers-backed model as a Hugging Face checkpoint directory plus ``deploy.json``."""
    if not hasattr(model.model, "save_pretrained"):
        raise ConfigError("only transformers models can be saved as checkpoint directories")
    out = Path(directory)
    model.model.save_pretrained(out, safe_serialization=True)
    deploy = {"name": model.name, "top_k": model.top_k, "input_size": list(model.preprocess.size), "resize": model.preprocess.resize}
    (out / DEPLOY_FILE).write_text(json.dumps(deploy, indent=2))
    return out


def load_hf_directory(path: Path) -> DeployModel:
    """A Hugging Face checkpoint directory (config.json + safetensors), loaded offline."""
    cfg_json = json.loads((path / "config.json").read_text())
    model_type = cfg_json.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not an RT-DETR ({', '.join(_MODEL_TYPES)})")
    _, model_cls = _transformers_classes(model_type)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor progress bar is noise in our output
    try:
        model = model_cls.from_pretrained(str(path), local_files_only=True).eval()
    except Exception as e:  # transformers raises several types for broken directories
        raise CheckpointError(f"{path}: cannot load the checkpoint ({e.__class__.__name__}: {e})") from None
    deploy = json.loads((path / DEPLOY_FILE).read_text()) if (path / DEPLOY_FILE).is_file() else {}
    size = deploy.get("input_size") or cfg_json.get("anchor_image_size") or [640, 640]
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    cfg = ModelConfig(name=deploy.get("name", path.name), model_type=model_type, input_size=tuple(size),
                      top_k=deploy.get("top_k", min(300, model.config.num_queries * len(names))), class_names=names,
                      resize=deploy.get("resize", "stretch"))
    return _wrap_hf(model, cfg)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a weights-only checkpoint ({e.__class__.__name__}); "
                              "the toolkit never unpickles arbitrary objects: re-save it as a plain state dict") from None
    for key in ("ema", "model", "state_dict"):  # official checkpoints nest the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key].get("module", obj[key]) if key == "ema" else obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def load_weights(model: DeployModel, path: Path, state: dict[str, torch.Tensor] | None = None) -> DeployModel:
    """Load a state dict (safetensors or .pth; ``state`` if already read from ``path``) into a built model;
    any missing/unexpected/mis-shaped key is an error."""
    state = _read_state_dict(path) if state is None else state
    target = model.model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    misshaped = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or misshaped:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        lines = [f"{path}: the weights do not fit config {model.name!r}"]
        if missing:
            lines.append(f"missing keys: {few(missing)}")
        if unexpected:
            lines.append(f"unexpected keys: {few(unexpected)}")
        if misshaped:
            lines.append("mis-shaped keys: " + few([f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in misshaped]))
        raise CheckpointError("; ".join(lines))
    model.model.load_state_dict(state, strict=True)
    return model


def wrap_module(module: nn.Module, *, class_names: list[str], preprocess: PreprocessSpec, top_k: int = 300,
                name: str = "custom") -> DeployModel:
    """Wrap a user module from a training repo: one that returns raw predictions, or one that implements the contract.

    The module is probed once on a zero image to find out which kind it is.
    """
    if isinstance(module, DeployModel):
        return module
    module = module.eval()
    h, w = preprocess.size
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    images = torch.zeros(1, 3, h, w, device=device)
    sizes = torch.tensor([[w, h]], device=device)
    with torch.inference_mode():
        try:
            out = module(images, sizes)
            is_contract = (isinstance(out, (tuple, list)) and len(out) == 3) or (isinstance(out, dict) and {"labels", "boxes", "scores"} <= set(out))
        except TypeError:  # forward takes images only: a raw-predictions model
            is_contract = False
        if not is_contract:
            raw_predictions(module(images))  # raises a clear error if the outputs are not recognisable
    return DeployModel(module, class_names=class_names, preprocess=preprocess, top_k=top_k, contract=is_contract, name=name)


def load_model(source: Any = None, *, config: str | Path | None = None, seed: int | None = None) -> DeployModel:
    """Any model the toolkit accepts, as a :class:`DeployModel`.

    ``source`` may be a DeployModel or nn.Module (``config`` gives class names and input size for a bare
    module), a Hugging Face checkpoint directory, a weights file (.safetensors/.pth/.pt, needs ``config``
    unless it is an official RT-DETR checkpoint: see :mod:`toolkit.official`), or None to build ``config``
    with random weights.
    """
    if isinstance(source, nn.Module):
        if isinstance(source, DeployModel):
            return source
        cfg = load_config(config) if config is not None else None
        if cfg is None and hasattr(source, "config") and hasattr(source.config, "id2label"):
            names = [source.config.id2label[i] for i in range(len(source.config.id2label))]
            return wrap_module(source, class_names=names, preprocess=PreprocessSpec(), top_k=min(300, source.config.num_queries * len(names)))
        if cfg is None:
            raise ConfigError("a bare nn.Module needs config= (for class names and input size)")
        return wrap_module(source, class_names=cfg.class_names, preprocess=cfg.preprocess, top_k=cfg.top_k, name=cfg.name)
    if source is None:
        if config is None:
            raise ConfigError(f"give a checkpoint or a config name; known configs: {', '.join(available_configs())}")
        return build_model(config, seed=seed)
    path = Path(source)
    if not path.exists() and isinstance(source, str) and source in available_configs():
        return build_model(source, seed=seed)  # a config name: random weights
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a checkpoint directory needs config.json (a Hugging Face checkpoint)")
        return load_hf_directory(path)
    from .official import load_official_checkpoint, looks_official

    state = _read_state_dict(path)
    if looks_official(state):  # a lyuwenyu/RT-DETR checkpoint: keys remapped, config inferred when not given
        return load_official_checkpoint(state, config=config, name=str(path))
    if config is None:
        raise ConfigError(f"{path}: a weights file needs --config NAME; known configs: {', '.join(available_configs())}")
    return load_weights(build_model(config), path, state)


def weights_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (names and raw bytes): identifies the weights an artifact was made from."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
