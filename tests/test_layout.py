"""The package's structure: stages import one way, no circles, small modules, the public face intact.

The import graph is read from the source (every ``import`` statement, lazy ones inside functions included),
so a circle that only bites at run time on some code path is still found.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "toolkit"
# each stage may import only the stages before it (the README's Layout section; each __init__ docstring)
ORDER = ["top", "models", "export", "runtime", "builders", "checks", "tasks", "serve", "cli"]
LEAVES = {"data", "testing", "fixtures"}  # self-contained helpers: datasets, the TensorRT test double
MAX_LINES = 400
EXEMPT = {"toolkit/testing/fake_tensorrt.py"}  # mirrors TensorRT's whole Python API surface


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    edges.add(full if full in mods else target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        # "from .. import __version__" reaches the package face, which imports nothing at import time
        graph[name] = {e for e in edges if e in mods and e not in (name, "toolkit")}
    return graph


def _stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and (PKG / parts[1]).is_dir()):
        return parts[1]
    return "cli" if module == "toolkit.cli" or module == "toolkit.__main__" else "top"


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                circles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_stages_import_one_way():
    wrong = []
    for src, targets in _graph().items():
        a = _stage(src)
        for dst in targets:
            b = _stage(dst)
            if a == b or b in LEAVES or a in LEAVES and b == "top":
                continue
            if a in LEAVES or b not in ORDER or a not in ORDER or ORDER.index(b) > ORDER.index(a):
                wrong.append(f"{src} ({a}) imports {dst} ({b})")
    assert not wrong, "imports against the stage order:\n" + "\n".join(sorted(wrong))


def test_modules_are_small():
    big = [f"{p.relative_to(ROOT)}: {n} lines" for p in PKG.rglob("*.py")
           if str(p.relative_to(ROOT)) not in EXEMPT and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines: " + ", ".join(big)


def test_every_stage_package_says_what_it_may_import():
    for d in sorted(p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((d / "__init__.py").read_text())) or ""
        assert doc, f"{d.relative_to(ROOT)}/__init__.py has no docstring"
        if d.name not in LEAVES | {"backends"}:
            assert "May import" in doc, f"{d.relative_to(ROOT)}/__init__.py does not say what it may import"


@pytest.mark.parametrize("name", ["load", "Engine", "export_onnx", "compare", "CompareReport", "preprocess", "load_model",
                                  "build_model", "available_configs", "Signature", "Binder", "inspect_file", "BindingError"])
def test_public_face(name):
    import toolkit

    assert getattr(toolkit, name) is not None


def test_import_toolkit_stays_light():
    code = "import sys, toolkit; heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'transformers') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import toolkit pulled in {out.stdout.strip()}"


def test_testing_double_is_importable_as_documented():
    from toolkit.testing import make_fake_tensorrt

    assert callable(make_fake_tensorrt)
