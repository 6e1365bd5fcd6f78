"""Artifacts: integrity records (ONNX metadata, sidecars, zip CRCs), file modes, temporaries on signals and SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import toolkit
from toolkit import integrity
from toolkit.atomic import atomic_path, remove_stale, write_text
from toolkit.errors import EngineError, IntegrityError
from toolkit.runtime.sidecar import read_sidecar, sidecar_path, write_sidecar
from toolkit.testing import make_fake_tensorrt

ROOT = Path(__file__).resolve().parents[1]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _plain_ort(path: Path, images: torch.Tensor, sizes: torch.Tensor) -> dict[str, np.ndarray]:
    """The independent reference: ONNX Runtime on the file as it is, no toolkit in between."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})))


# --- integrity -----------------------------------------------------------------------------------------------------


def test_exported_onnx_is_sealed_and_a_bit_flip_is_refused(tiny_onnx, tmp_path, sample_images):
    images, sizes = sample_images
    good = tmp_path / "good.onnx"
    shutil.copy(tiny_onnx, good)
    out = toolkit.load(good, device="cpu")(images=images, orig_target_sizes=sizes)
    ref = _plain_ort(good, images, sizes)
    np.testing.assert_allclose(out["boxes"].numpy(), ref["boxes"], atol=1e-5)
    assert integrity.check_onnx(good) is True

    bad = tmp_path / "bad.onnx"
    shutil.copy(tiny_onnx, bad)
    _flip(bad, bad.stat().st_size // 2)  # inside the weights: ONNX Runtime still loads it
    flipped = _plain_ort(bad, images, sizes)
    assert flipped["boxes"].shape == ref["boxes"].shape  # plain ORT runs the damaged file without a word
    with pytest.raises(IntegrityError, match=f"{bad}: sha256 .* differs"):
        toolkit.load(bad, device="cpu")
    with pytest.raises(toolkit.ToolkitError, match=str(bad)):
        from toolkit.tasks.inspect import inspect_file

        inspect_file(bad)


def test_truncated_onnx_names_the_sizes(tiny_onnx, tmp_path):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(tiny_onnx.read_bytes()[:-10])
    with pytest.raises(EngineError, match=r"cut\.onnx"):
        toolkit.load(bad, device="cpu")


def test_foreign_onnx_without_a_seal_still_loads(tmp_path):
    """A file another tool wrote carries no record: nothing to check, it loads as before."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    path = tmp_path / "foreign.onnx"
    onnx.save(model, str(path))
    assert integrity.check_onnx(path) is False


def test_fast_path_skips_rehashing_an_unchanged_file(tiny_onnx, tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    shutil.copy(tiny_onnx, path)
    integrity.forget(path)
    assert integrity.check_onnx(path)
    calls = []
    real = integrity.hashlib.sha256
    monkeypatch.setattr(integrity.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert integrity.check_onnx(path)
    assert calls == []  # same path, size, inode, mtime: no hash
    _flip(path, path.stat().st_size // 3)  # rewriting changes the mtime: hashed again, and refused
    with pytest.raises(IntegrityError):
        integrity.check_onnx(path)
    assert calls


@pytest.fixture(scope="module")
def fake_engine(tiny_onnx, tmp_path_factory):
    from toolkit.builders.build import build_engine

    fake = make_fake_tensorrt("10")
    path = tmp_path_factory.mktemp("trt") / "tiny.engine"
    build_engine(tiny_onnx, path, trt_module=fake, progress=False, cache=False)
    return path, fake


def test_engine_sidecar_records_size_and_sha256(fake_engine, tmp_path):
    path, fake = fake_engine
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["integrity"] == {"size": path.stat().st_size, "sha256": integrity.file_sha256(path)}
    copy = tmp_path / "copy.engine"
    shutil.copy(path, copy)
    shutil.copy(sidecar_path(path), sidecar_path(copy))
    toolkit.load(copy, trt_module=fake)
    _flip(copy, copy.stat().st_size // 2)
    with pytest.raises(IntegrityError, match=r"copy\.engine: sha256 .* recorded in its sidecar copy\.engine\.json"):
        toolkit.load(copy, trt_module=fake)


def test_hand_written_sidecar_without_a_record_is_refused(fake_engine, tmp_path):
    path, fake = fake_engine
    lone = tmp_path / "random.engine"
    lone.write_bytes(os.urandom(4096))
    meta = {k: v for k, v in read_sidecar(path).items() if k != "integrity"}
    sidecar_path(lone).write_text(json.dumps(meta))
    from toolkit.tasks.inspect import inspect_file

    for call in (lambda: toolkit.load(lone, trt_module=fake), lambda: inspect_file(lone)):
        with pytest.raises(IntegrityError, match=r"random\.engine: its sidecar random\.engine\.json records no size and sha256"):
            call()


def _package(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("tiny/data/weights.bin", payload)
        z.writestr("tiny/version", b"1")
    return path


def test_pt2_zip_entries_are_crc_checked_before_aotinductor(tiny_model, tmp_path, monkeypatch):
    """A package damaged before its sidecar was written (sha256 matches the damage): the CRC still catches it."""
    path = _package(tmp_path / "m.pt2", bytes(range(256)) * 64)
    data = bytearray(path.read_bytes())
    at = data.find(bytes(range(256)))
    data[at + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    write_sidecar(path, {"backend": "aoti", "device": "cpu", "signature": tiny_model.signature().to_dict()})
    called = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: called.append(a))
    with pytest.raises(IntegrityError, match=r"m\.pt2: zip entry tiny/data/weights\.bin fails its CRC check"):
        toolkit.load(path)
    assert called == []
    from toolkit.tasks.inspect import inspect_file

    with pytest.raises(IntegrityError, match="CRC"):
        inspect_file(path)
    random = tmp_path / "random.pt2"
    random.write_bytes(os.urandom(2048))
    write_sidecar(random, {"backend": "aoti", "device": "cpu", "signature": tiny_model.signature().to_dict()})
    with pytest.raises(IntegrityError, match=r"random\.pt2: not a readable zip package"):
        inspect_file(random)


# --- modes and temporaries -----------------------------------------------------------------------------------------


def test_artifacts_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        write_text(tmp_path / "b.json", "{}")
        assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640
        os.chmod(tmp_path / "a.json", 0o600)  # overwriting keeps an existing file's mode, as open() does
        write_text(tmp_path / "a.json", "[]")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_exported_onnx_mode_follows_the_umask(tiny_onnx):
    mask = os.umask(0)
    os.umask(mask)
    assert tiny_onnx.stat().st_mode & 0o777 == 0o666 & ~mask


_WRITER = """
import sys, time
from toolkit.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


def _writer(target: Path, ignore: tuple[int, ...] = ()) -> tuple[subprocess.Popen, Path]:
    """A process in the middle of an atomic write. Its signals start at their defaults, as under a terminal (a
    test run started under nohup or in a background job would otherwise hand it SIGHUP/SIGINT ignored), except
    ``ignore``."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def dispositions() -> None:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN if s in ignore else signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=dispositions)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file() and f".{target.name}.{proc.pid}." in tmp.name
    return proc, tmp


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_write_removes_the_temporary_and_exits_128_plus_n(tmp_path, sig):
    target = tmp_path / "model.onnx"
    proc, tmp = _writer(target)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not tmp.exists() and not target.exists()
    assert list(tmp_path.iterdir()) == []
    if sig == signal.SIGINT:  # the default handler: KeyboardInterrupt unwinds through the cleanup
        assert proc.returncode != 0
    else:
        assert proc.returncode == 128 + sig, err
        assert err.strip().splitlines() == [f"rtdetr-deploy: stopped by {signal.Signals(sig).name}; removed 1 unfinished file"]


def test_an_ignored_signal_stays_ignored_during_a_write(tmp_path):
    """Started under nohup (SIGHUP ignored), a write goes on through SIGHUP; SIGTERM still cleans up."""
    target = tmp_path / "model.onnx"
    proc, tmp = _writer(target, ignore=(signal.SIGHUP,))
    proc.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=2)
    assert tmp.exists()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_removed_on_the_next_write(tmp_path):
    target = tmp_path / "model.onnx"
    proc, tmp = _writer(target)
    proc.kill()
    proc.wait(timeout=30)
    assert tmp.exists()  # SIGKILL cannot be caught
    live = tmp_path / f".{target.name}.{os.getpid()}.abcd1234.tmp"  # a live process's (ours): kept
    live.write_bytes(b"")
    other = tmp_path / ".other.onnx.1.abcd1234.tmp"  # another target's: not ours to judge
    other.write_bytes(b"")
    write_text(target, "done")
    assert target.read_text() == "done" and not tmp.exists() and live.exists() and other.exists()
    assert remove_stale(target, force=True) == []
    dead = tmp_path / f".other.onnx.{proc.pid}.0123abcd.tmp"  # the killed process's, for another target
    dead.write_bytes(b"")
    assert remove_stale(target) == [] and dead.exists()  # scanned a moment ago: not again
    assert remove_stale(target, force=True) == [dead] and not dead.exists()


@pytest.mark.slow  # a real export in a subprocess
def test_cli_export_sigterm_leaves_nothing(tmp_path):
    """A real export (the CLI), SIGTERMed while its temporary file exists: exit 143, one line, nothing left."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    target = tmp_path / "m.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "export", "--config", "tiny", "-o", str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert proc.poll() is None, "export finished before its temporary file was seen"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("rtdetr-deploy: stopped by SIGTERM")
    assert "export: loading the model done (" in err and "export: tracing with torch.onnx.export (opset 17) ..." in err
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_progress_lines_with_elapsed_time_and_heartbeat():
    import io

    from toolkit.progress import Steps

    buf = io.StringIO()
    steps = Steps("build", stream=buf, heartbeat_s=0.05)
    with steps.step("compiling"):
        time.sleep(0.2)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "build: compiling ..." and lines[-1].startswith("build: compiling done (")
    assert any(line.startswith("build: still compiling (") for line in lines[1:-1])
    quiet = io.StringIO()
    with Steps("x", enabled=False, stream=quiet).step("y"):
        pass
    assert quiet.getvalue() == ""


def test_build_refuses_a_changed_onnx_and_rebuilds_a_damaged_cache_entry(tiny_onnx, tmp_path, monkeypatch):
    from toolkit.builders.build import build_engine, cache_dir

    monkeypatch.setenv("RTDETR_DEPLOY_CACHE", str(tmp_path / "cache"))
    fake = make_fake_tensorrt("10")
    bad = tmp_path / "bad.onnx"
    shutil.copy(tiny_onnx, bad)
    _flip(bad, bad.stat().st_size // 2)
    with pytest.raises(IntegrityError, match=r"bad\.onnx: sha256"):
        build_engine(bad, tmp_path / "x.engine", trt_module=fake, progress=False)
    assert not (tmp_path / "x.engine").exists()
    first = build_engine(tiny_onnx, tmp_path / "a.engine", trt_module=fake, progress=False)
    cached = [p for p in cache_dir().iterdir() if p.suffix == ".engine"]
    assert not first.cached and len(cached) == 1
    _flip(cached[0], cached[0].stat().st_size // 2)  # the cache entry rots on disk
    second = build_engine(tiny_onnx, tmp_path / "b.engine", trt_module=fake, progress=False)
    assert not second.cached  # a miss: rebuilt, not copied
    assert (tmp_path / "b.engine").read_bytes() == (tmp_path / "a.engine").read_bytes()
    toolkit.load(tmp_path / "b.engine", trt_module=fake)
    assert build_engine(tiny_onnx, tmp_path / "c.engine", trt_module=fake, progress=False).cached  # the cache is whole again


def test_build_backend_defaults(monkeypatch):
    import importlib.util

    from toolkit.cli import stages as cli

    assert cli._build_target(None, Path("m.pt2")) == ("aoti", Path("m.pt2"))
    assert cli._build_target(None, Path("m.engine")) == ("tensorrt", Path("m.engine"))
    assert cli._build_target("aoti", None) == ("aoti", Path("model.pt2"))
    assert cli._build_target(None, None, from_model=True) == ("aoti", Path("model.pt2"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("tensorrt") else real(name, *a))
    assert cli._build_target(None, None) == ("aoti", Path("model.pt2"))  # the best backend installed, said in a note
