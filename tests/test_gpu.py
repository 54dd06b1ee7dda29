"""GPU tests (TensorRT + NVIDIA GPU): the trtexec fallback builds and times a real engine, the engine's mAP tracks
ONNX Runtime, Polygraphy's comparison passes, and a foreign engine is refused with one line. Skipped elsewhere."""
import sys

import pytest
from conftest import MINI, MODEL, requires_gpu, run_tool

from tools.trtlog import parse_file

pytestmark = requires_gpu


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    path = out / "fp16.engine"
    log = out / "build.log"
    res = run_tool("tools.trtexec_py", f"--onnx={MODEL}", f"--saveEngine={path}", "--fp16",
                   "--minShapes=images:1x3x640x640", "--optShapes=images:4x3x640x640",
                   "--maxShapes=images:8x3x640x640", "--builderOptimizationLevel=0", "--skipInference")
    log.write_text(res.stdout + res.stderr)
    assert res.returncode == 0, res.stderr[-3000:]
    return path, log


def test_fallback_build_log_parses(engine):
    path, log = engine
    row = parse_file(log)
    assert row["fallback"] and row["build_s"] > 0 and row["engine_mib"] > 1 and path.stat().st_size > 1e6


@pytest.mark.parametrize("graph", [False, True])
def test_fallback_timing(engine, tmp_path, graph):
    path, _ = engine
    res = run_tool("tools.trtexec_py", f"--loadEngine={path}", "--shapes=images:4x3x640x640", "--noDataTransfers",
                   "--warmUp=100", "--duration=0.5", *(["--useCudaGraph"] if graph else []))
    assert res.returncode == 0, res.stderr[-3000:]
    log = tmp_path / "bench.log"
    log.write_text(res.stdout)
    row = parse_file(log)
    assert row["throughput_qps"] > 10 and 0 < row["gpu_min_ms"] <= row["gpu_median_ms"] <= row["gpu_p99_ms"]
    assert row["activation_bytes"] > 0 and row["passed"]


def test_engine_map_tracks_onnxruntime(engine):
    from tools.evaluate import evaluate

    path, _ = engine
    trt = evaluate(path, MINI, batch=8, workers=4)
    ort = evaluate(MODEL, MINI, batch=8, workers=4)
    assert abs(trt["map50_95"] - ort["map50_95"]) < 0.01, (trt, ort)


def test_polygraphy_comparison_passes(engine, tmp_path):
    from tools.compare import compare

    path, _ = engine
    res = compare(path, MODEL, MINI, tmp_path, count=2, polygraphy=[sys.executable, "-m", "tools.polygraphy_cli"])
    assert res["passed"] and res["min_required_atol"] < 0.5 and res["abs_err_mean"] < 0.05


def test_foreign_engine_is_refused(tmp_path):
    bogus = tmp_path / "other.engine"
    bogus.write_bytes(b"\x00" * 4096)
    res = run_tool("tools.trtexec_py", f"--loadEngine={bogus}", "--shapes=images:1x3x640x640")
    assert res.returncode == 2 and "cannot load this engine" in res.stderr and "Traceback" not in res.stderr
