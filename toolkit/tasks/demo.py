"""``rtdetr-deploy demo``: the whole toolkit on the shipped trained fixture, offline, on CPU or GPU.

export -> verify -> build the best engine available here -> run on generated images -> compare every
engine with ONNX Runtime -> COCO evaluation -> a results folder with annotated images and report.md.
Built engines are cached (keyed by the fixture's weights), so a second run is faster.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..atomic import write_text
from ..errors import ConfigError

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "shapes"


@dataclass
class DemoReport:
    output_dir: Path
    device: str
    engines: dict[str, str] = field(default_factory=dict)  # backend -> file
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why
    compare: dict[str, bool] = field(default_factory=dict)  # backend -> agrees with ONNX Runtime
    eval_table: str = ""
    eval_agree: bool = False
    steps: list[tuple[str, float]] = field(default_factory=list)  # (step, seconds)

    @property
    def ok(self) -> bool:
        return all(self.compare.values()) and self.eval_agree

    def markdown(self) -> str:
        lines = [f"# rtdetr-deploy demo ({'PASS' if self.ok else 'FAIL'})", "", f"Device: {self.device}", "",
                 "| step | seconds |", "| --- | --- |"]
        lines += [f"| {name} | {sec:.1f} |" for name, sec in self.steps]
        lines += ["", "## Engines", ""]
        lines += [f"- {b}: `{f}`" for b, f in self.engines.items()]
        lines += [f"- {b}: skipped ({why})" for b, why in self.skipped.items()]
        lines += ["", "## Compared with ONNX Runtime (detection by detection)", ""]
        lines += [f"- {b}: {'agrees' if ok else 'DISAGREES'} (see compare_{b}/report.md)" for b, ok in self.compare.items()]
        lines += ["", "## COCO evaluation", "", "```", self.eval_table, "```", "",
                  "Annotated images: `images/*.det.png`."]
        return "\n".join(lines) + "\n"


def fixture_path() -> Path:
    if not (FIXTURE_DIR / "config.json").is_file():
        raise ConfigError(f"the trained fixture is missing from {FIXTURE_DIR}; train it with "
                          "'python -m toolkit.tasks.train --config shapes --out runs/shapes' and copy runs/shapes/model there")
    return FIXTURE_DIR


def _build_engines(model_dir: Path, onnx_path: Path, device: torch.device, out: Path, report: DemoReport) -> dict[str, Path]:
    """The best engines available here: TensorRT where it exists (GPU), AOTInductor always (both cached)."""
    from ..builders.aoti import build_aoti

    engines: dict[str, Path] = {}
    if device.type == "cuda" and importlib.util.find_spec("tensorrt") is not None:
        from ..builders.build import build_engine

        res = build_engine(onnx_path, out / "model.engine", backend="tensorrt", batch=(1, 4, 16))
        engines["tensorrt"] = res.path
    else:
        report.skipped["tensorrt"] = "TensorRT is not installed here" if device.type == "cuda" else "no CUDA GPU here"
    engines["aoti"] = build_aoti(model_dir, out / "model.pt2", device=device.type, batch=(1, 4, 16))
    return engines


def demo(output_dir: str | Path = "runs/demo", *, model_dir: str | Path | None = None, device: str | None = None,
         images: int = 6, eval_images: int = 100, say: Callable[[str], Any] = print) -> DemoReport:
    """Run the demo into ``output_dir`` (on ``model_dir``, a checkpoint directory; default the shipped fixture).

    ``say`` receives one line per step (progress)."""
    from .. import load
    from ..progress import Steps
    from ..checks.compare import compare
    from ..data import make_shapes_dataset
    from ..export.onnx import export_onnx
    from .evaluate import evaluate
    from .run import run

    dev = torch.device(device) if device else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = DemoReport(out, str(dev))
    model_dir = Path(model_dir) if model_dir is not None else fixture_path()

    steps = Steps("demo", stream=_Say(say))

    def step(name: str, fn: Callable[[], Any]) -> Any:
        """A line when the step starts, "still ..." every 30 s while it runs, and one with its elapsed time."""
        start = time.perf_counter()
        with steps.step(f"[{len(report.steps) + 1}] {name}"):
            result = fn()
        report.steps.append((name, time.perf_counter() - start))
        return result

    onnx_path = out / "model.onnx"
    result = step("export + verify in ONNX Runtime", lambda: export_onnx(model_dir, onnx_path))
    say("    " + result.verify.summary().replace("\n", "\n    "))
    engines = step("build engines", lambda: _build_engines(model_dir, onnx_path, dev, out, report))
    report.engines = {"onnxruntime": str(onnx_path), **{b: str(p) for b, p in engines.items()}}
    step("generate images", lambda: make_shapes_dataset(out / "data", 0, images, seed=4242, size=320))
    val_images = sorted((out / "data" / "val").glob("*.png"))
    ort = load(onnx_path, device=dev if dev.type == "cpu" or _ort_cuda() else "cpu")
    step("run (ONNX Runtime)", lambda: run(ort, val_images, out / "images"))
    for backend, path in engines.items():
        rep = step(f"compare {backend} with ONNX Runtime",
                   lambda path=path, backend=backend: compare(ort, load(path, backend=backend, device=dev), val_images,
                                                               report_dir=out / f"compare_{backend}"))
        report.compare[backend] = rep.ok
        say(f"    {rep.summary().splitlines()[0]}")
    sources = {"onnxruntime": ort, **{b: load(p, backend=b, device=dev) for b, p in engines.items()},
               "torch": load(model_dir, backend="torch", device=dev)}
    ev = step("COCO evaluation", lambda: evaluate(sources, synthetic=eval_images, device=dev, progress=True,
                                                  say=lambda line: say(f"    {line}")))
    report.eval_table, report.eval_agree = ev.table(), ev.agree
    write_text(out / "report.md", report.markdown())
    write_text(out / "report.json", json.dumps({"ok": report.ok, "device": report.device, "engines": report.engines,
                                                 "skipped": report.skipped, "compare": report.compare,
                                                 "eval": ev.to_dict(), "steps": report.steps}, indent=1))
    return report


class _Say:
    """A text stream over ``say``: progress lines (:class:`toolkit.progress.Steps`) go where the demo's lines go."""

    def __init__(self, say: Callable[[str], Any]) -> None:
        self._say = say

    def write(self, text: str) -> None:
        for line in text.splitlines():
            self._say(line)

    def flush(self) -> None:
        pass


def _ort_cuda() -> bool:
    from ..runtime.backends.onnxruntime import cuda_available

    return cuda_available()
