"""TensorRT backend and builder on CPU, through the TensorRT test double (toolkit.testing.fake_tensorrt).

The double runs the ONNX graph in ONNX Runtime but reads and writes raw memory at the bound addresses as the
dtypes the *engine* declares, so the zero-coordinate bug of TensorRT 8 (int64 ``orig_target_sizes`` bound to an
int32 input) is reproduced for real here, and the toolkit's fix is shown to work.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import toolkit
from toolkit.builders.build import BuildError, build_engine
from toolkit.errors import BindingError, EngineError, MissingDependencyError
from toolkit.runtime.sidecar import sidecar_path, write_sidecar
from toolkit.testing import make_fake_tensorrt

VERSIONS = ("8.6", "10", "11")
ROOT = Path(__file__).resolve().parents[1]
SURFACE = Path(__file__).parent / "data" / "tensorrt_api_surface.txt"


@pytest.fixture(scope="module")
def engines(tiny_onnx, tmp_path_factory):
    """The tiny ONNX built through the real build code with the double, per emulated version: {version: (path, fake)}."""
    out = {}
    for version in VERSIONS:
        fake = make_fake_tensorrt(version)
        path = tmp_path_factory.mktemp(f"trt{version}") / "tiny.engine"
        build_engine(tiny_onnx, path, trt_module=fake, progress=False, cache=False)
        out[version] = (path, fake)
    return out


@pytest.fixture(scope="module")
def ort_engine(tiny_onnx):
    return toolkit.load(tiny_onnx, device="cpu")


def _assert_same(out, ref):
    assert torch.equal(out["labels"].long(), ref["labels"].long())
    torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["scores"], ref["scores"], atol=1e-4, rtol=0)


# (a) build with the real build code, load, run, compare with ONNX Runtime ----------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_build_load_run_matches_onnxruntime(version, engines, ort_engine, sample_images):
    path, fake = engines[version]
    images, sizes = sample_images
    engine = toolkit.load(path, backend="tensorrt", trt_module=fake)
    sig = engine.signature
    narrowed = "int32" if version == "8.6" else "int64"  # TensorRT 8 casts int64 I/O to int32
    assert sig.input("orig_target_sizes").dtype == narrowed and sig.output("labels").dtype == narrowed
    assert sig.input("images").shape == ("N", 3, 128, 128) and sig.bounds("N") == (1, 8)
    assert sig.preprocess is not None and sig.preprocess.size == (128, 128)
    out = engine(images=images, orig_target_sizes=sizes)
    assert out["labels"].dtype == getattr(torch, narrowed)
    _assert_same(out, ort_engine(images=images, orig_target_sizes=sizes))
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["library"] == "fake-tensorrt" and meta["precision"] == "fp32" and meta["profile"]["images"]["max"][0] == 8
    assert meta["signature"]["inputs"][1]["dtype"] == narrowed
    assert ("typed it int32" in meta["orig_target_sizes_note"]) == (version == "8.6")


def test_one_context_per_thread(engines, ort_engine, sample_images):
    path, fake = engines["10"]
    images, sizes = sample_images
    engine = toolkit.load(path, trt_module=fake)
    ref = ort_engine(images=images, orig_target_sizes=sizes)
    results, contexts = [], set()

    def work():
        results.append(engine(images=images, orig_target_sizes=sizes))
        contexts.add(id(engine._local.context))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and len(contexts) == 2
    for out in results:
        _assert_same(out, ref)


# (b) the required proof: the zero-coordinate bug, and the toolkit's fix ------------------------------------------


def test_raw_int64_pointer_on_trt8_zeroes_every_y(engines, ort_engine, sample_images):
    path, fake = engines["8.6"]
    images = sample_images[0][:1].contiguous()
    sizes = torch.tensor([[640, 640]])  # int64, as the official export's dummy input and the user's code
    trt = fake
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(path.read_bytes())
    assert engine.get_tensor_dtype("orig_target_sizes") == trt.DataType.INT32
    ctx = engine.create_execution_context()
    assert ctx.set_input_shape("images", tuple(images.shape)) and ctx.set_input_shape("orig_target_sizes", (1, 2))
    assert ctx.set_tensor_address("images", images.data_ptr())
    assert ctx.set_tensor_address("orig_target_sizes", sizes.data_ptr())  # int64 bytes where int32 is expected
    outputs = {}
    for name in ("labels", "boxes", "scores"):
        dtype = {"INT32": torch.int32, "FLOAT": torch.float32}[engine.get_tensor_dtype(name).name]
        outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype)
        assert ctx.set_tensor_address(name, outputs[name].data_ptr())
    assert ctx.execute_async_v3(0)
    boxes = outputs["boxes"]
    assert torch.all(boxes[..., 1] == 0) and torch.all(boxes[..., 3] == 0)  # [[640,640]] read as [[640,0]]
    assert torch.any(boxes[..., 0] != 0) and torch.any(boxes[..., 2] != 0)

    ref = ort_engine(images=images, orig_target_sizes=sizes)
    assert torch.any(ref["boxes"][..., 1] != 0)
    fixed = toolkit.load(path, backend="tensorrt", trt_module=fake)(images=images, orig_target_sizes=sizes)  # cast="safe"
    _assert_same(fixed, ref)
    strict = toolkit.load(path, backend="tensorrt", trt_module=fake, cast="none")
    with pytest.raises(BindingError, match="int32"):
        strict(images=images, orig_target_sizes=sizes)


# (c) every TensorRT misuse return value becomes a clear error ----------------------------------------------------


def test_batch_beyond_profile_refused_by_binder_before_tensorrt(engines):
    path, fake = engines["10"]
    engine = toolkit.load(path, trt_module=fake)
    before = engine._logger.count
    with pytest.raises(BindingError, match=r"outside the engine's range \[1, 8\]"):
        engine(images=torch.rand(9, 3, 128, 128), orig_target_sizes=torch.full((9, 2), 128))
    assert engine._logger.count == before  # TensorRT never saw it
    # what TensorRT itself does with it: False, a logged error, and the previous shape kept [CB]
    records = []

    class Recorder(fake.ILogger):
        def log(self, severity, msg):
            records.append((severity, msg))

    ctx = fake.Runtime(Recorder()).deserialize_cuda_engine(path.read_bytes()).create_execution_context()
    assert ctx.set_input_shape("images", (2, 3, 128, 128))
    assert not ctx.set_input_shape("images", (9, 3, 128, 128))
    assert tuple(ctx.get_tensor_shape("images")) == (2, 3, 128, 128)
    assert "satisfyProfile" in records[-1][1] and "Valid range for profile 0: [1,3,128,128]..[8,3,128,128]" in records[-1][1]
    assert not ctx.set_tensor_address("nope", 1) and not ctx.set_input_shape("labels", (1, 100))


def test_failed_execution_leaves_outputs_untouched(engines):
    path, fake = engines["10"]
    engine = fake.Runtime(fake.Logger(fake.Logger.INTERNAL_ERROR)).deserialize_cuda_engine(path.read_bytes())
    ctx = engine.create_execution_context()
    scores = torch.full((1, 100), 7.0)
    assert ctx.set_input_shape("images", (1, 3, 128, 128)) and ctx.set_input_shape("orig_target_sizes", (1, 2))
    assert ctx.set_tensor_address("scores", scores.data_ptr())
    assert ctx.execute_async_v3(0) is False  # no input address
    assert torch.all(scores == 7.0)
    assert engine.get_tensor_dtype("unknown") == fake.DataType.FLOAT
    assert engine.get_tensor_mode("unknown") == fake.TensorIOMode.NONE


def _copy_engine(src: Path, dst_dir: Path, data: bytes | None = None) -> Path:
    dst = dst_dir / "copy.engine"
    dst.write_bytes(src.read_bytes() if data is None else data)
    write_sidecar(dst, json.loads(sidecar_path(src).read_text()))  # records dst's own size and sha256
    return dst


def test_not_an_engine(engines, tmp_path):
    path, fake = engines["10"]
    bad = _copy_engine(path, tmp_path, b"this is not a TensorRT plan" * 10)
    with pytest.raises(EngineError, match="not a TensorRT engine") as e:
        toolkit.load(bad, trt_module=fake)
    assert "TensorRT said" in str(e.value) and "magicTag" in str(e.value)


def test_empty_engine_file(engines, tmp_path):
    path, fake = engines["10"]
    with pytest.raises(EngineError, match=r"empty \(0 bytes\)"):
        toolkit.load(_copy_engine(path, tmp_path, b""), trt_module=fake)


def test_missing_sidecar(engines, tmp_path):
    path, fake = engines["10"]
    lone = tmp_path / "lone.engine"
    lone.write_bytes(path.read_bytes())
    with pytest.raises(EngineError, match="sidecar"):
        toolkit.load(lone, trt_module=fake)


def test_sidecar_for_another_gpu_or_version(engines, tmp_path):
    path, fake = engines["10"]
    copy = _copy_engine(path, tmp_path)
    meta = json.loads(sidecar_path(copy).read_text())
    sidecar_path(copy).write_text(json.dumps({**meta, "compute_capability": "8.6"}))
    with pytest.raises(EngineError, match="built for compute capability 8.6.*this GPU.*is 9.0"):
        toolkit.load(copy, trt_module=fake)
    with pytest.raises(EngineError, match="built with fake-tensorrt 10.16.0, this is fake-tensorrt 11.4.0"):
        toolkit.load(path, trt_module=make_fake_tensorrt("11"))
    # without the sidecar check, TensorRT itself refuses such plans [I-CC] [I-V10]
    logs = []

    class Recorder(fake.ILogger):
        def log(self, severity, msg):
            logs.append(msg)

    other_gpu = make_fake_tensorrt("10", compute_capability=(8, 6))
    assert other_gpu.Runtime(Recorder()).deserialize_cuda_engine(path.read_bytes()) is None
    assert "incompatible device, expecting compute 9.0 got compute 8.6" in logs[-1]
    assert make_fake_tensorrt("11").Runtime(Recorder()).deserialize_cuda_engine(path.read_bytes()) is None
    assert "Version tag does not match" in logs[-1]


def _onnx(tmp_path: Path, name: str, nodes, inputs, outputs, opset=17) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.example", 1)])
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_every_parser_error_is_reported(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("MyOp", ["x"], ["h"], name="custom_1", domain="com.example"),
             helper.make_node("OtherOp", ["h"], ["y"], name="custom_2", domain="com.example")]
    path = _onnx(tmp_path, "custom", nodes, [x], [y])
    with pytest.raises(BuildError, match=r"\(2 error\(s\)\)") as e:
        build_engine(path, tmp_path / "m.engine", trt_module=make_fake_tensorrt("10"), progress=False, cache=False)
    msg = str(e.value)
    assert "node 0 'custom_1' (MyOp): No importer registered for op: MyOp" in msg and "'custom_2' (OtherOp)" in msg
    assert not (tmp_path / "m.engine").exists()


def test_static_batch_outside_the_batch_range(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    path = _onnx(tmp_path, "static", [helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    with pytest.raises(BuildError, match=r"fixes the batch at 2.*batch=\(2, 2, 2\)"):
        build_engine(path, tmp_path / "m.engine", batch=(4, 4, 8), trt_module=make_fake_tensorrt("10"), progress=False, cache=False)
    result = build_engine(path, tmp_path / "m.engine", trt_module=make_fake_tensorrt("10"), progress=False, cache=False)
    assert result.signature.input("x").shape == (2, 3) and result.metadata["profile"] == {}


def test_profile_set_shape_and_missing_library():
    fake = make_fake_tensorrt("10")
    profile = fake.Builder(fake.Logger()).create_optimization_profile()
    with pytest.raises(RuntimeError, match="inconsistent"):
        profile.set_shape("images", (4, 3), (2, 3), (8, 3))
    from toolkit.runtime.backends.tensorrt import import_tensorrt

    if any(importlib.util.find_spec(n) for n in ("tensorrt", "tensorrt_rtx", "tensorrt_rtx_bindings")):
        pytest.skip("a TensorRT module is installed here")
    with pytest.raises(MissingDependencyError, match=r"pip install 'rtdetr-deploy\[tensorrt\]'"):
        import_tensorrt()


# (d) version emulation -------------------------------------------------------------------------------------------


def test_version_enums():
    trt11, trt10, trt8 = make_fake_tensorrt("11"), make_fake_tensorrt("10"), make_fake_tensorrt("8.6")
    with pytest.raises(AttributeError):
        trt11.BuilderFlag.FP16
    with pytest.raises(AttributeError):
        trt11.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    assert int(trt11.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 0
    assert trt10.BuilderFlag.FP16 is not None and trt10.NetworkDefinitionCreationFlag.EXPLICIT_BATCH is not None
    assert not hasattr(trt8, "IProgressMonitor") and not hasattr(trt8.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    with pytest.raises(AttributeError):
        trt8.DataType.INT64
    assert trt10.DataType.INT64.itemsize == 8 and trt8.DataType.HALF.itemsize == 2
    # 8.6's ONNX parser needs EXPLICIT_BATCH [O86MI]
    net = trt8.Builder(trt8.Logger()).create_network(0)
    parser = trt8.OnnxParser(net, trt8.Logger())
    assert not parser.parse(b"") and "explicit batch" in parser.get_error(0).desc()


@pytest.mark.parametrize("version", ["10", "11"])
def test_fp16_from_fp32_onnx_is_not_delivered(version, tiny_onnx, tmp_path):
    out = tmp_path / "m.engine"
    with pytest.raises(BuildError, match="fp16 was requested but the built engine is fp32.*modelopt.onnx.autocast"):
        build_engine(tiny_onnx, out, precision="fp16", trt_module=make_fake_tensorrt(version), progress=False, cache=False)
    assert not out.exists() and not sidecar_path(out).exists()


def test_fp16_onnx_graph_gives_fp16_on_11_and_weak_typing_on_8(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)]
    path = _onnx(tmp_path, "half", nodes, [x], [y])
    result = build_engine(path, tmp_path / "h.engine", precision="fp16", trt_module=make_fake_tensorrt("11"), progress=False, cache=False)
    assert result.precision == "fp16" and result.metadata["strongly_typed"]
    weak = build_engine(tmp_path / "half.onnx", tmp_path / "w.engine", precision="fp16", trt_module=make_fake_tensorrt("8.6"),
                        progress=False, cache=False)
    assert weak.precision == "fp16" and "weak typing" in " ".join(weak.warnings)
    with pytest.raises(BuildError, match="no BuilderFlag.BF16"):
        build_engine(path, tmp_path / "b.engine", precision="bf16", trt_module=make_fake_tensorrt("8.6"), progress=False, cache=False)


# (e) engine cache, timing cache, progress ------------------------------------------------------------------------


def test_engine_cache_hit(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("RTDETR_DEPLOY_CACHE", str(tmp_path / "cache"))
    fake = make_fake_tensorrt("10")
    timing = tmp_path / "timing.cache"
    first = build_engine(tiny_onnx, tmp_path / "a.engine", trt_module=fake, progress=True, timing_cache=timing)
    assert not first.cached and timing.is_file() and json.loads(timing.read_bytes())["entries"] > 0
    start = time.perf_counter()
    second = build_engine(tiny_onnx, tmp_path / "b.engine", trt_module=fake, timing_cache=timing)
    assert second.cached and time.perf_counter() - start < first.seconds + 1.0
    assert (tmp_path / "b.engine").read_bytes() == (tmp_path / "a.engine").read_bytes()
    assert sidecar_path(tmp_path / "b.engine").is_file()
    assert toolkit.load(tmp_path / "b.engine", trt_module=fake).signature == toolkit.load(tmp_path / "a.engine", trt_module=fake).signature
    other = build_engine(tiny_onnx, tmp_path / "c.engine", trt_module=make_fake_tensorrt("11"), progress=False)
    assert not other.cached  # another library version is another key
    assert not build_engine(tiny_onnx, tmp_path / "d.engine", batch=(1, 2, 4), trt_module=fake, progress=False).cached


# (f) the API surface the toolkit calls exists in the real TensorRT 10 and 11 ------------------------------------

# Every name the toolkit reads from tensorrt objects (module attributes, methods, properties, enum members).
USED = {
    "module": ["ILogger", "Runtime", "TensorIOMode", "Builder", "NetworkDefinitionCreationFlag", "OnnxParser",
               "MemoryPoolType", "BuilderFlag", "IProgressMonitor", "DataType"],
    "members": ["deserialize_cuda_engine", "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype",
                "get_tensor_shape", "get_tensor_profile_shape", "create_execution_context", "set_input_shape",
                "set_tensor_address", "execute_async_v3", "create_network", "parse_from_file", "num_errors", "get_error",
                "code", "desc", "node", "node_name", "node_operator", "create_builder_config", "set_memory_pool_limit",
                "set_flag", "create_optimization_profile", "set_shape", "add_optimization_profile", "create_timing_cache",
                "set_timing_cache", "get_timing_cache", "serialize", "progress_monitor", "phase_start", "step_complete",
                "phase_finish", "build_serialized_network", "num_inputs", "get_input", "num_outputs", "get_output",
                "num_layers", "get_layer", "dtype", "shape", "name", "is_network_output", "is_network_input", "log",
                "NONE", "INPUT", "OUTPUT", "WORKSPACE", "STRONGLY_TYPED"],
    # reached only through getattr/hasattr, for the versions that have them
    "guarded": ["EXPLICIT_BATCH", "FP16", "BF16"],
}


def _surface() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for line in SURFACE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, versions = line.split()
            for v in versions.split(","):
                names.setdefault(v.split(".")[0], set()).add(name)
    return names


def _present(name: str, surface: set[str]) -> bool:
    # the linker merges string tails: "INPUT" may only exist as the end of "ATTENTION_INPUT"
    return name in surface or any(s.endswith(name) for s in surface)


@pytest.mark.parametrize("major", ["10", "11"])
def test_api_surface_exists_in_real_tensorrt(major):
    surface = _surface()[major]
    missing = [n for n in USED["module"] + USED["members"] if not _present(n, surface)]
    assert not missing, f"not in the real TensorRT {major} bindings: {missing}"
    assert ("EXPLICIT_BATCH" in surface) == (major == "10")  # why build code reaches it through getattr
    assert ("FP16" in surface) == (major == "10")


def test_api_surface_list_is_complete_and_the_double_implements_it():
    """Every ``trt.X`` the toolkit touches is in USED, and the double has each module-level name."""
    used = set(USED["module"] + USED["members"] + USED["guarded"])
    for rel in ("toolkit/runtime/backends/tensorrt.py", "toolkit/builders/tensorrt.py"):
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
                assert node.attr in used | {"__version__", "__name__", "FAKE", "fake_gpu_name", "fake_compute_capability"}, (rel, node.attr)
    for version in VERSIONS:
        fake = make_fake_tensorrt(version)
        for name in USED["module"]:
            assert hasattr(fake, name) or (name == "IProgressMonitor" and version == "8.6"), (version, name)


def test_import_toolkit_stays_light():
    code = ("import sys, toolkit, toolkit.builders.build, toolkit.testing, toolkit.runtime.backends.tensorrt; "
            "print(sorted(m for m in ('tensorrt', 'onnxruntime', 'tensorrt_rtx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_build_without_tensorrt_is_one_clear_line(tiny_onnx, tmp_path):
    from tests.conftest import run_cli

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    out = run_cli("build", str(tiny_onnx), "-o", str(tmp_path / "m.engine"), "--batch", "1,2,4")
    assert out.returncode == 2 and "TensorRT is not installed" in out.stderr and "Traceback" not in out.stderr
    bad = run_cli("build", str(tiny_onnx), "-o", str(tmp_path / "m.engine"), "--batch", "1,2")
    assert bad.returncode == 2 and "MIN,OPT,MAX" in bad.stderr + bad.stdout
    assert not (tmp_path / "m.engine").exists()


# real TensorRT (skips here) --------------------------------------------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_matches_onnxruntime(tiny_onnx, tmp_path, sample_images, ort_engine):
    images, sizes = sample_images
    result = build_engine(tiny_onnx, tmp_path / "tiny.engine", progress=False, cache=False)
    engine = toolkit.load(result.path)
    out = engine(images=images.cuda(), orig_target_sizes=sizes.cuda())
    ref = ort_engine(images=images, orig_target_sizes=sizes)
    _assert_same({k: v.cpu() for k, v in out.items()}, ref)
