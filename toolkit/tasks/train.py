"""Train a model of a named config on the synthetic shapes dataset, within a wall-time budget, resumably.

    python -m toolkit.tasks.train --config shapes --out DIR --seconds 480 --seed 0
    python -m toolkit.tasks.train --resume DIR --seconds 300          # a second chunk, same schedule
    python -m toolkit.tasks.train --init toolkit/fixtures/shapes --data-start 72320 --out DIR   # warm restart

Uses transformers' RT-DETR and its own loss (``labels=[{"class_labels", "boxes" (normalized cxcywh)}]``),
AdamW, linear warm-up then a cosine schedule over *training seconds* (``--schedule-seconds``, by default
this run's training time), bf16 autocast on CUDA. ``--seconds`` bounds the whole command: the loop stops
early enough to leave ``--reserve`` seconds for the held-out evaluation and the final save.

Writes ``DIR/checkpoint.pt`` (every ``--checkpoint-every`` seconds and at the end: model, optimizer, step,
trained seconds, loss curve), ``DIR/train_record.json`` (commands, seeds, GPU, times, steps, loss curve,
held-out mAP), ``DIR/loss.png`` and ``DIR/model/`` (the shipped HF checkpoint + deploy.json; float weights
stored as fp16, loaded back as fp32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.config import ModelConfig, build_model, load_config
from ..models.loading import load_model, save_model

CHECKPOINT = "checkpoint.pt"
RECORD = "train_record.json"


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path
    steps: int
    trained_seconds: float
    record: dict[str, Any]


def _lr_factor(t: float, step: int, warmup_steps: int, horizon: float, final: float = 0.05) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    p = min(1.0, t / max(1e-6, horizon))
    return warm * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))


def _targets(targets: list[dict[str, torch.Tensor]], h: int, w: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Dataset targets (xyxy px) -> transformers labels (class_labels, normalized cxcywh boxes)."""
    from torchvision.ops import box_convert

    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return [{"class_labels": t["labels"].to(device, non_blocking=True),
             "boxes": box_convert(t["boxes"] / scale, "xyxy", "cxcywh").to(device, non_blocking=True)} for t in targets]


def _gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_shipped(model: Any, directory: Path, dtype: torch.dtype = torch.float16) -> Path:
    """``save_model`` then rewrite the safetensors with float tensors in ``dtype`` (config.json keeps float32,
    so loading gives an fp32 model)."""
    from safetensors.torch import load_file, save_file

    out = save_model(model, directory)
    for f in out.glob("*.safetensors"):
        state = load_file(str(f))
        small = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        if dtype == torch.float16:
            big = [k for k, v in state.items() if v.is_floating_point() and v.abs().max() > 6e4]
            if big:
                raise ValueError(f"weights out of fp16 range: {', '.join(big[:5])}")
        save_file(small, str(f), metadata={"format": "pt"})
    return out


def plot_loss(curve: list[dict[str, float]], path: Path, title: str) -> str | None:
    """Loss curve PNG; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (transformers RT-DETR)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def held_out_map(model: Any, n: int, seed: int, size: tuple[int, int], device: torch.device, batch_size: int = 32) -> dict[str, float]:
    """COCO mAP of ``model`` (a DeployModel) on ``n`` val-split images of ``seed`` (never trained on)."""
    from ..data.shapes import ShapesDataset, coco_dict
    from ..runtime.detections import split_batch
    from .evaluate import coco_map

    ds = ShapesDataset(n, seed=seed, size=size, split="val", class_names=model.class_names)
    samples, results = [], []
    model = model.to(device).eval()
    inner = getattr(model.model, "model", None)
    if getattr(inner, "anchors", None) is not None:
        inner.anchors, inner.valid_mask = inner.anchors.to(device), inner.valid_mask.to(device)
    for i in range(0, n, batch_size):
        items = [ds[j] for j in range(i, min(n, i + batch_size))]
        images = torch.stack([im for im, _ in items]).to(device).float() / 255
        h, w = images.shape[-2:]
        sizes = torch.tensor([[w, h]] * len(items), device=device)
        with torch.inference_mode():
            labels, boxes, scores = model(images, sizes)
        for k, ((_, t), d) in enumerate(zip(items, split_batch({"labels": labels, "boxes": boxes, "scores": scores}))):
            samples.append((f"{i + k}", (h, w), {"boxes": t["boxes"].numpy(), "labels": t["labels"].numpy(), "areas": t["area"].numpy()}))
            results += d.to_coco(i + k + 1)
    return coco_map(coco_dict(samples, model.class_names), results)


def train(config: str | Path | ModelConfig = "shapes", out_dir: str | Path = "runs/shapes", *, seconds: float = 480,
          seed: int = 0, batch_size: int = 32, lr: float = 4e-4, weight_decay: float = 1e-4, warmup_steps: int = 300,
          schedule_seconds: float | None = None, checkpoint_every: float = 60, reserve: float = 45, workers: int | None = None,
          device: str | torch.device | None = None, resume: str | Path | None = None, max_steps: int | None = None,
          eval_images: int = 300, log_every: int = 10, grad_clip: float = 0.1, data_size: int | None = None,
          init: str | Path | None = None, data_start: int | None = None,
          command: str | None = None, progress: bool = True) -> TrainResult:
    """Train until ``seconds`` of wall time (from this call) minus ``reserve`` or ``max_steps``; see the module doc.

    ``init``: start from the weights of a trained model directory (a warm restart: fresh optimizer and
    schedule), e.g. the shipped fixture; ``data_start``: index of the first training image (to continue the
    data stream of an earlier run instead of repeating it).
    """
    from tqdm import tqdm

    from ..data.shapes import ShapesDataset, collate

    t0 = time.perf_counter()
    out = Path(resume if resume is not None and out_dir is None else out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = None
    if resume is not None:
        ckpt = Path(resume) / CHECKPOINT
        if not ckpt.is_file():
            raise FileNotFoundError(f"--resume {resume}: no {CHECKPOINT} there")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        config = ModelConfig(**state["config"])
        seed = int(state["seed"])
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deploy = build_model(cfg, seed=seed)
    if init is not None:
        deploy.model.load_state_dict(load_model(init).model.state_dict())
    model = deploy.model.to(dev).train()
    inner = getattr(model, "model", None)
    if getattr(inner, "anchors", None) is not None:  # plain attributes, not buffers: .to() leaves them on the CPU
        inner.anchors, inner.valid_mask = inner.anchors.to(dev), inner.valid_mask.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step, trained, curve, runs = 0, 0.0, [], []
    horizon = schedule_seconds
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, trained, curve, runs = int(state["step"]), float(state["trained_seconds"]), list(state["curve"]), list(state["runs"])
        horizon = schedule_seconds or float(state["schedule_seconds"])
        batch_size = int(state["batch_size"])
    size = data_size or cfg.input_size[0]
    h, w = (size, size) if data_size else tuple(cfg.input_size)
    if workers is None:
        workers = min(14, max(0, (os.cpu_count() or 1) - 2)) if dev.type == "cuda" else 0
    dataset = ShapesDataset(10**9, seed=seed, size=(h, w), split="train", class_names=cfg.class_names)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=range(step * batch_size if data_start is None else data_start, 10**9),
                                         num_workers=workers, collate_fn=collate, pin_memory=dev.type == "cuda",
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    deadline = t0 + seconds - reserve
    it = iter(loader)
    first = next(it)  # worker start-up counts against the budget, not the schedule
    loop_start = time.perf_counter()
    if horizon is None:
        horizon = max(1.0, deadline - loop_start)
    run = {"command": command or " ".join(map(shlex.quote, [sys.executable, "-m", "toolkit.tasks.train", *sys.argv[1:]])),
           "seed": seed, "device": _gpu_name(dev), "torch": str(torch.__version__), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "startup_seconds": round(loop_start - t0, 2), "step_start": step, "batch_size": batch_size, "lr": lr,
           "workers": workers, "resumed_from": str(resume) if resume else None, "init_from": str(init) if init else None,
           "data_start": step * batch_size if data_start is None else data_start}
    try:
        import transformers

        run["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    last_ckpt = time.perf_counter()
    loss_acc, n_acc = 0.0, 0
    bar = tqdm(desc="train", unit="step", disable=not progress, dynamic_ncols=True)

    def checkpoint() -> None:
        _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "trained_seconds": trained, "curve": curve, "runs": runs + [run], "seed": seed,
                            "schedule_seconds": horizon, "batch_size": batch_size,
                            "config": {**cfg.__dict__, "input_size": list(cfg.input_size)}}, out / CHECKPOINT)

    batch = first
    seg_start = time.perf_counter()
    while True:
        images, targets = batch
        images = images.to(dev, non_blocking=True).float().div_(255)
        labels = _targets(targets, h, w, dev)
        factor = _lr_factor(trained + (time.perf_counter() - seg_start), step, warmup_steps, horizon)
        for g in opt.param_groups:
            g["lr"] = lr * factor
        with autocast:
            outputs = model(pixel_values=images, labels=labels)
        loss = outputs.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        step += 1
        loss_acc += float(loss.detach())
        n_acc += 1
        now = time.perf_counter()
        if step % log_every == 0 or n_acc and (now >= deadline or (max_steps and step >= max_steps)):
            curve.append({"step": step, "seconds": round(trained + now - seg_start, 2), "loss": loss_acc / n_acc, "lr": lr * factor})
            bar.set_postfix(loss=f"{loss_acc / n_acc:.3f}", lr=f"{lr * factor:.2e}")
            loss_acc, n_acc = 0.0, 0
        bar.update(1)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}")
        if now >= deadline or (max_steps and step >= max_steps):
            break
        if now - last_ckpt >= checkpoint_every:
            trained += now - seg_start
            seg_start = now
            checkpoint()
            last_ckpt = time.perf_counter()
            seg_start = last_ckpt  # checkpoint time is not training time
        batch = next(it)
    trained += time.perf_counter() - seg_start
    bar.close()
    del it, loader
    run.update(step_end=step, steps=step - run["step_start"], train_seconds=round(time.perf_counter() - loop_start, 2),
               steps_per_second=round((step - run["step_start"]) / max(1e-6, time.perf_counter() - loop_start), 2))
    checkpoint()

    model.eval()
    model_dir = save_shipped(deploy, out / "model")
    size_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6
    shipped = load_model(str(model_dir))  # what users get: fp16-stored weights, loaded as fp32
    evaluation = None
    if eval_images:
        try:
            evaluation = held_out_map(shipped, eval_images, seed=seed, size=(h, w), device=dev)
            evaluation["images"] = eval_images
            evaluation["what"] = f"shipped model (fp16 weights, fp32 compute), torch eager, {eval_images} val-split images of seed {seed}"
        except ImportError as e:  # the model is saved; only the evaluation is missing
            evaluation = {"error": str(e)}
    run["wall_seconds"] = round(time.perf_counter() - t0, 2)
    runs.append(run)
    record = {"config": cfg.name, "params": sum(p.numel() for p in model.parameters()), "model_dir": str(model_dir),
              "weights_mb": round(size_mb, 2), "weights_dtype": "float16 (loaded as float32)", "steps": step,
              "trained_seconds": round(trained, 1), "schedule_seconds": round(horizon, 1), "runs": runs,
              "eval": evaluation, "loss_curve": curve}
    note = plot_loss(curve, out / "loss.png", f"{cfg.name}: {step} steps, {trained:.0f} s")
    if note:
        record["plot"] = note
    (out / RECORD).write_text(json.dumps(record, indent=1))
    return TrainResult(out, model_dir, step, trained, record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toolkit.tasks.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="shapes")
    p.add_argument("--out", default=None, help="output directory (default: the --resume directory, else runs/<config>)")
    p.add_argument("--seconds", type=float, default=480, help="wall-time budget of this whole command")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--schedule-seconds", type=float, default=None, help="cosine horizon in training seconds (across resumed chunks)")
    p.add_argument("--checkpoint-every", type=float, default=60)
    p.add_argument("--reserve", type=float, default=45, help="seconds kept for the final evaluation and save")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--resume", default=None, help="continue the run in this directory")
    p.add_argument("--init", default=None, help="start from this trained model directory (fresh optimizer and schedule)")
    p.add_argument("--data-start", type=int, default=None, help="index of the first training image (default: 0, or where --resume left off)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-images", type=int, default=300)
    p.add_argument("--data-size", type=int, default=None, help="square image size (default: the config's input size)")
    p.add_argument("--log-every", type=int, default=10, help="steps per loss-curve point")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    out = a.out or a.resume or f"runs/{a.config}"
    cmd = " ".join(map(shlex.quote, ["python", "-m", "toolkit.tasks.train", *(argv if argv is not None else sys.argv[1:])]))
    res = train(a.config, out, seconds=a.seconds, seed=a.seed, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps,
                schedule_seconds=a.schedule_seconds, checkpoint_every=a.checkpoint_every, reserve=a.reserve, workers=a.workers,
                device=a.device, resume=a.resume, max_steps=a.max_steps, eval_images=a.eval_images, data_size=a.data_size, log_every=a.log_every,
                init=a.init, data_start=a.data_start,
                command=cmd, progress=not a.no_progress)
    ev = res.record.get("eval") or {}
    print(f"{res.steps} steps, {res.trained_seconds:.0f} s trained; model {res.model_dir} ({res.record['weights_mb']} MB)"
          + (f"; held-out mAP {ev['mAP']:.3f} mAP50 {ev['mAP50']:.3f}" if "mAP" in ev else f"; {ev.get('error', 'no evaluation')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
