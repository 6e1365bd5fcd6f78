"""Models: named configs in ``configs/``, Hugging Face checkpoint directories, weight files, user modules.

Everything ends up as a :class:`~toolkit.models.contract.DeployModel`: the detector behind the deploy
contract, with its class names and preprocessing. The RT-DETR implementation is transformers'
(``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..signature import PreprocessSpec
from .config import (
    _MODEL_TYPES,
    DEPLOY_FILE,
    ModelConfig,
    _transformers_classes,
    _wrap_hf,
    available_configs,
    build_model,
    load_config,
)
from .contract import DeployModel, raw_predictions
from .weights import _read_state_dict, load_weights


def save_model(model: DeployModel, directory: str | Path) -> Path:
    """Save a transformers-backed model as a Hugging Face checkpoint directory plus ``deploy.json``."""
    if not hasattr(model.model, "save_pretrained"):
        raise ConfigError("only transformers models can be saved as checkpoint directories")
    official = getattr(model.model, "_toolkit_official_structure", None)
    if official:  # transformers would reload it with its own structure: different boxes, silently
        raise ConfigError(f"{model.name}: an official {official} checkpoint runs with the official structure, which a Hugging "
                          f"Face directory cannot record (transformers would rebuild it differently); keep the .pth, or "
                          f"export it (rtdetr-deploy export CHECKPOINT.pth -o model.onnx)")
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
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a supported detector ({', '.join(_MODEL_TYPES)})")
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


def wrap_module(module: nn.Module, *, class_names: list[str], preprocess: PreprocessSpec, top_k: int = 300,
                name: str = "custom") -> DeployModel:
    """Wrap a user module from a training repo: one that returns raw predictions, or one that implements the contract.

    The module is probed once on a zero image to find out which kind it is. A transformers detector of a
    registered family (RT-DETR, D-FINE, DEIMv2, RF-DETR, LW-DETR: :mod:`toolkit.models.families`) is recognised
    by its config and not probed (its second positional argument is ``pixel_mask``, not ``orig_target_sizes``);
    it gets its family's wrapper, with the input normalization its network expects applied inside. Engines run the module in
    eval mode (``toolkit.load`` switches it); a training loop switches it back with ``module.train()``.
    """
    if isinstance(module, DeployModel):
        return module
    if _is_family_module(module):  # any registered family: its wrapper (normalization included), never the probe
        q = module.config.num_queries
        cfg = ModelConfig(name=name, model_type=module.config.model_type, input_size=tuple(preprocess.size),
                          top_k=min(top_k, q * len(class_names)), class_names=list(class_names), resize=preprocess.resize)
        return _wrap_hf(module, cfg)
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


def _is_family_module(module: nn.Module) -> bool:
    return getattr(getattr(module, "config", None), "model_type", None) in _MODEL_TYPES and hasattr(module, "model")


def _transformers_module(module: nn.Module, cfg: ModelConfig | None) -> DeployModel:
    """A transformers detector of a registered family (as a training loop holds it) behind the deploy contract."""
    config = module.config
    names = [config.id2label[i] for i in range(config.num_labels)]
    if cfg is not None:
        if len(cfg.class_names) != config.num_labels:
            raise ConfigError(f"config {cfg.name!r} has {len(cfg.class_names)} classes, the module {config.num_labels}")
        names, size, top_k, resize, name = cfg.class_names, tuple(cfg.input_size), cfg.top_k, cfg.resize, cfg.name
    else:
        size = tuple(getattr(config, "anchor_image_size", None) or (640, 640))
        top_k, resize, name = 300, "stretch", "custom"
    cfg = ModelConfig(name=name, model_type=config.model_type, input_size=size, top_k=min(top_k, config.num_queries * len(names)),
                      class_names=list(names), resize=resize)
    return _wrap_hf(module, cfg)  # the family's wrapper (its normalization included), never wrap_module's probe


def load_model(source: Any = None, *, config: str | Path | None = None, seed: int | None = None) -> DeployModel:
    """Any model the toolkit accepts, as a :class:`DeployModel`.

    ``source`` may be a DeployModel or nn.Module (``config`` gives class names and input size for a bare
    module), a Hugging Face checkpoint directory, a weights file (.safetensors/.pth/.pt, needs ``config``
    unless it is an official RT-DETR, D-FINE or DEIMv2 checkpoint: see :mod:`toolkit.models.official`,
    :mod:`toolkit.models.official_dfine`, :mod:`toolkit.models.official_deimv2`), or None to build ``config``
    with random weights.
    """
    if isinstance(source, nn.Module):
        if isinstance(source, DeployModel):
            return source
        cfg = load_config(config) if config is not None else None
        if _is_family_module(source):
            return _transformers_module(source, cfg)
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
        if config is not None:  # ignoring it would record a config the model does not have
            raise ConfigError(f"{path} is a checkpoint directory, which carries its own config (config.json); "
                              f"drop --config {config} (configs are for weights files and random weights)")
        return load_hf_directory(path)
    from .official import load_official_checkpoint, looks_official
    from .official_deimv2 import load_deimv2_checkpoint, looks_deimv2
    from .official_dfine import load_dfine_checkpoint, looks_dfine

    state = _read_state_dict(path)
    if looks_deimv2(state):  # an Intellindust-AI-Lab/DEIMv2 checkpoint (its names extend D-FINE's: checked first)
        return load_deimv2_checkpoint(state, config=config, name=str(path))
    if looks_dfine(state):  # a Peterande/D-FINE checkpoint (its names extend RT-DETR's: checked first)
        return load_dfine_checkpoint(state, config=config, name=str(path))
    if looks_official(state):  # a lyuwenyu/RT-DETR checkpoint: keys remapped, config inferred when not given
        return load_official_checkpoint(state, config=config, name=str(path))
    if config is None:
        raise ConfigError(f"{path}: a weights file needs --config NAME; known configs: {', '.join(available_configs())}")
    return load_weights(build_model(config), path, state)


