"""GPU tests (TensorRT + NVIDIA GPU): the trtexec fallback builds and times a real engine, the engine's mAP tracks
ONNX Runtime, Polygraphy's comparison passes, the ultralytics copy runs as the engine does, and a foreign engine is
refused with one line. Skipped elsewhere."""
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
                   "--maxShapes=images:8x3x640x640", "--builderOptimizationLevel=0", "--profilingVerbosity=detailed",
                   "--skipInference")
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


def test_ultralytics_copy_runs_as_the_engine_does(engine, tmp_path):
    """The drop-in copy (tools.ultralytics_engine): our readers run it behind its header and give the plain engine's
    outputs; its input keeps the ONNX's dynamic dims, which is why ultralytics needs rect=False (README)."""
    import numpy as np
    import tensorrt as trt

    from tools.evaluate import TrtBackend
    from tools.ultralytics_engine import metadata, read, write

    path, _ = engine
    copy = write(path, metadata(MODEL, 8, True, 640, 16), tmp_path / "fp16.ultralytics.engine")
    res = run_tool("tools.trtexec_py", f"--loadEngine={copy}", "--shapes=images:4x3x640x640", "--warmUp=100",
                   "--duration=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    x = np.random.default_rng(0).random((4, 3, 640, 640), dtype=np.float32)
    outs = []
    for p in (path, copy):
        backend = TrtBackend(p)
        outs.append(backend.infer(x))
        backend.close()
    assert outs[0].shape == (4, 84, 8400) and np.allclose(outs[0], outs[1], atol=1e-3)
    loaded = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(read(copy)[1])
    # the batch stays dynamic (-1) in the engine, as trtexec builds it from the exported ONNX: ultralytics then takes
    # the engine for a dynamic one and letterboxes to a rectangle, the reason README gives for rect=False
    assert tuple(loaded.get_tensor_shape("images")) == (-1, 3, 640, 640)


def test_foreign_engine_is_refused(tmp_path):
    bogus = tmp_path / "other.engine"
    bogus.write_bytes(b"\x00" * 4096)
    res = run_tool("tools.trtexec_py", f"--loadEngine={bogus}", "--shapes=images:1x3x640x640")
    assert res.returncode == 2 and "cannot load this engine" in res.stderr and "Traceback" not in res.stderr


def tiny_onnx(path):
    """Two convolutions: an engine TensorRT builds in seconds, at any level."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
              for s, n in (((16, 3, 3, 3), "w1"), ((16, 16, 3, 3), "w2")))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 3, 64, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 16, 64, 64])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_build_server_keeps_the_timing_cache_across_builds(tmp_path):
    """Two builds through one server: the second finds the level's in-memory timing cache filled by the first."""
    import os
    import subprocess
    import time

    from tools.trtexec_py import stop_server

    model, sock = tmp_path / "tiny.onnx", str(tmp_path / "s.sock")
    tiny_onnx(model)
    server = subprocess.Popen([sys.executable, "-m", "tools.trtexec_py", "--serve", sock])
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        logs = []
        for i in (1, 2):
            res = run_tool("tools.trtexec_py", f"--onnx={model}", f"--saveEngine={tmp_path / f'{i}.engine'}", "--fp16",
                           "--builderOptimizationLevel=1", "--skipInference", TRTEXEC_PY_SERVER=sock)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            logs.append(res.stdout)
        assert "build 1 of this process" in logs[0] and "build 2 of this process" in logs[1]
        before = [int(l.split(": ")[1].split()[0]) for l in logs[1].splitlines() if "In-memory timing cache" in l]
        assert before and before[0] > 0  # the first build's timings were there for the second
        assert parse_file_text(logs[1])["build_s"] > 0 and (tmp_path / "2.engine").stat().st_size > 0
    finally:
        stop_server(sock)
        server.wait(timeout=60)


def parse_file_text(text):
    from tools.trtlog import parse

    return parse(text)


def test_per_layer_profile_of_a_real_engine(engine, tmp_path):
    from tools.yolo.layers import load

    path, _ = engine
    layers, prof = tmp_path / "l.json", tmp_path / "p.json"
    res = run_tool("tools.trtexec_py", f"--loadEngine={path}", "--shapes=images:4x3x640x640", "--noDataTransfers",
                   "--separateProfileRun", "--dumpProfile", f"--exportProfile={prof}", f"--exportLayerInfo={layers}",
                   "--duration=0.3", "--warmUp=100")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = load(layers, prof)
    kinds = {r["kind"] for r in rows}
    assert "conv" in kinds and sum(r["ms"] for r in rows) > 0.05
    assert all(r["block"] for r in rows if r["ms"] > 0)


def test_static_batch_engine_is_scored_with_a_padded_last_batch(tmp_path):
    """A static batch-8 engine scores 30 images (the last batch of 6 padded) like ONNX Runtime does."""
    from tools.evaluate import evaluate

    path = tmp_path / "b8.engine"
    res = run_tool("tools.trtexec_py", f"--onnx={MODEL}", f"--saveEngine={path}", "--fp16",
                   "--minShapes=images:8x3x640x640", "--optShapes=images:8x3x640x640",
                   "--maxShapes=images:8x3x640x640", "--builderOptimizationLevel=0", "--skipInference")
    assert res.returncode == 0, res.stderr[-3000:]
    trt = evaluate(path, MINI, batch=8, limit=30, workers=4)
    ort = evaluate(MODEL, MINI, batch=8, limit=30, workers=4)
    assert trt["images"] == 30 and abs(trt["map50_95"] - ort["map50_95"]) < 0.01, (trt, ort)


def test_end_to_end_timing_of_a_real_engine(engine):
    """tools.e2e on a real engine: every stage timed, the loops run, and the whole frame costs more than inference."""
    from tools.core.files import list_images
    from tools.yolo.preprocess import read_image
    from tools.e2e import Thresholds, measure_engine

    path, _ = engine
    frames = [read_image(p) for p in list_images(MINI)[:8]]
    row = measure_engine(path, 4, frames, 640, Thresholds(), 2, 0.2, 0.5)
    assert row["input"] == "float32-nchw" and row["nms"] == "cpu"
    assert all(row[f"{s}_p50"] > 0 for s in ("letterbox", "normalise", "h2d", "infer", "d2h", "nms"))
    assert row["total_p50"] > row["infer_p50"] and row["loop_ips"] > 0 and row["resident_ips"] > row["loop_ips"]


def test_end_to_end_engine_scores_like_the_raw_engine(engine, tmp_path):
    """yolo11n end to end (uint8 NHWC in, EfficientNMS_TRT at ultralytics val's thresholds inside), built at level 0
    with the fallback: the evaluator feeds it pixels, reads its num_dets rows, and scores it within 0.01 mAP50-95 of
    the raw FP16 engine of the same model; the fallback times it on uint8 input."""
    from tools.engine import NO_LIBRARY_TACTICS
    from tools.evaluate import TrtBackend, evaluate

    onnx_path, path = tmp_path / "e2e.onnx", tmp_path / "e2e.engine"
    res = run_tool("tools.deploy_graph", str(MODEL), "-o", str(onnx_path), "--input", "uint8-nhwc", "--nms",
                   "--conf", "0.001", "--iou", "0.7", "--max-det", "300")
    assert res.returncode == 0, res.stderr
    res = run_tool("tools.trtexec_py", f"--onnx={onnx_path}", f"--saveEngine={path}", "--fp16",
                   "--minShapes=images:1x640x640x3", "--optShapes=images:4x640x640x3",
                   "--maxShapes=images:8x640x640x3", "--builderOptimizationLevel=0", "--skipInference",
                   f"--tacticSources={NO_LIBRARY_TACTICS}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    backend = TrtBackend(path)
    assert backend.uint8 and backend.nhwc and backend.nms
    backend.close()
    e2e = evaluate(path, MINI, batch=8, workers=4)
    raw = evaluate(engine[0], MINI, batch=8, workers=4)
    assert e2e["images"] == raw["images"] == 32 and abs(e2e["map50_95"] - raw["map50_95"]) < 0.01, (e2e, raw)
    res = run_tool("tools.trtexec_py", f"--loadEngine={path}", "--shapes=images:4x640x640x3", "--noDataTransfers",
                   "--warmUp=100", "--duration=0.5")
    assert res.returncode == 0, res.stderr[-3000:]
    log = tmp_path / "bench.log"
    log.write_text(res.stdout)
    assert parse_file(log)["throughput_qps"] > 10


def test_fp16_io_engine_of_the_rewritten_model(engine, tmp_path):
    """Issue 19 on the GPU: the rewritten model (split-conv, head-split) built with a float16 input and output
    (--inputIOFormats/--outputIOFormats=fp16:chw through the fallback): the engine's I/O tensors are HALF, the runners
    feed it float16 (get_tensor_dtype), it scores within 0.01 mAP50-95 of the plain FP16 engine, and the fallback
    times it on float16 input. Its timing against FP16 is the sweep's (recipes/grids/yolo11n-rewrites.yaml)."""
    import numpy as np
    import tensorrt as trt

    from tools.evaluate import TrtBackend, evaluate

    onnx_path, path = tmp_path / "rw.onnx", tmp_path / "rw.engine"
    res = run_tool("tools.graph_rewrites", str(MODEL), str(onnx_path), "--rewrites", "split-conv,head-split")
    assert res.returncode == 0, res.stderr
    res = run_tool("tools.trtexec_py", f"--onnx={onnx_path}", f"--saveEngine={path}", "--fp16",
                   "--minShapes=images:1x3x640x640", "--optShapes=images:4x3x640x640",
                   "--maxShapes=images:8x3x640x640", "--builderOptimizationLevel=0", "--skipInference",
                   "--inputIOFormats=fp16:chw", "--outputIOFormats=fp16:chw")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "inputIOFormats: images HALF LINEAR" in res.stdout
    loaded = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(path.read_bytes())
    assert loaded.get_tensor_dtype("images") == trt.float16 and loaded.get_tensor_dtype("output0") == trt.float16
    backend = TrtBackend(path)
    assert backend.dtype == np.float16
    x = np.random.default_rng(0).random((4, 3, 640, 640), dtype=np.float32).astype(np.float16)
    assert backend.infer(x).dtype == np.float32  # widened on the host
    backend.close()
    fp16io = evaluate(path, MINI, batch=8, workers=4)
    plain = evaluate(engine[0], MINI, batch=8, workers=4)
    assert fp16io["images"] == plain["images"] == 32
    assert abs(fp16io["map50_95"] - plain["map50_95"]) < 0.01, (fp16io, plain)
    res = run_tool("tools.trtexec_py", f"--loadEngine={path}", "--shapes=images:4x3x640x640", "--noDataTransfers",
                   "--warmUp=100", "--duration=0.5", "--useCudaGraph")
    assert res.returncode == 0, res.stderr[-3000:]
    log = tmp_path / "bench.log"
    log.write_text(res.stdout)
    assert parse_file(log)["throughput_qps"] > 10


def test_strongly_typed_build_refuses_a_type_change_in_one_line(tmp_path):
    """TensorRT >= 10: a strongly typed network takes its I/O types from the ONNX; --inputIOFormats=fp16 is refused
    by name (TensorRT 8.6 has no strongly typed networks: skipped there)."""
    import tensorrt as trt

    if int(trt.__version__.split(".")[0]) < 10:
        pytest.skip(f"TensorRT {trt.__version__} has no strongly typed networks")
    model = tmp_path / "tiny.onnx"
    tiny_onnx(model)
    res = run_tool("tools.trtexec_py", f"--onnx={model}", f"--saveEngine={tmp_path / 't.engine'}", "--stronglyTyped",
                   "--inputIOFormats=fp16:chw", "--skipInference")
    assert res.returncode == 2 and "strongly typed network takes its types from the ONNX" in res.stderr
    assert "Traceback" not in res.stderr
