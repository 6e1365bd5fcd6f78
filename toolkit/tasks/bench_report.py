"""Bench results as people read them: the table rows (with the ratio to ONNX Runtime) and the latency picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows for a terminal or markdown table, with the ratios to the two peers a user would pick instead, measured in
    the same run: ONNX Runtime (no graph) and ``torch.compile`` (reduce-overhead), at the same precision and batch."""
    def peer(backend: str) -> dict[tuple[str, int], float]:
        return {(r["precision"], r["batch"]): r["median_ms"] for r in report["rows"]
                if r["backend"] == backend and not r["cuda_graph"] and r["status"] == "ok"}

    ort, compiled = peer("onnxruntime"), peer("torch-compile")
    out = []
    for r in report["rows"]:
        label = f"{r['backend']} {r['precision']}" + (" +graph" if r["cuda_graph"] else "")
        if r["status"] != "ok":
            out.append([label, str(r["batch"]), r["status"], "", "", "", "", "", r["reason"]])
            continue
        ratio, vs_compile = (_ratio(peers.get((r["precision"], r["batch"])), r["median_ms"]) for peers in (ort, compiled))
        built = f"build {r['build_s']:.0f} s, " if r.get("build_s") and r["build_s"] >= 1 else ""
        built += f"compile {r['compile_s']:.1f} s, " if r.get("compile_s") is not None else ""
        out.append([label, str(r["batch"]), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                    f"{r['images_per_s']:.0f}" + (f" (e2e {e2e:.0f})" if (e2e := r.get("end_to_end_images_per_s")) else ""), ratio, vs_compile,
                    f"{built}first call {r['first_call_s']:.1f} s"])
    return out


def _ratio(peer_ms: float | None, ms: float) -> str:
    """How many times faster than the peer ('' where the run has no such peer row)."""
    return f"{peer_ms / ms:.2f}x" if peer_ms else ""


TABLE_HEADER = ["config", "batch", "median ms", "p90 ms", "p99 ms", "img/s", "vs ORT", "vs compile", "notes"]


def plot_bench(report: dict[str, Any], path: str | Path) -> Path:
    """Latency and throughput against batch size, one line per configuration (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in report["rows"]:
        if r["status"] == "ok":
            label = f"{r['backend']} {r['precision']}" + (" +graph" if r["cuda_graph"] else "")
            series.setdefault(label, []).append((r["batch"], r["median_ms"], r["images_per_s"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    env = report.get("environment", {})
    ax1.set_yscale("log")  # latencies span two orders of magnitude across backends
    for ax, title, unit in ((ax1, "latency (median)", "ms"), (ax2, "throughput", "images/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"rtdetr-deploy bench on {env.get('gpu', env.get('device', '?'))}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
