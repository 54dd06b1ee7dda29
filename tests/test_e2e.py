"""End-to-end timing tool, host side: the preprocessing it times is the evaluator's, its NMS decoding is the
evaluator's, and its tables pair each INT8 engine with the FP16 engine of the same kind and profile."""
import numpy as np
import pytest
from conftest import MINI, MODEL, run_tool

from tools.core.files import list_images
from tools.e2e import Thresholds, engine_input, letterbox_frame, markdown, raw_detections, speedups, summarise
from tools.yolo.decode import postprocess
from tools.yolo.preprocess import preprocess, read_image, to_input


@pytest.fixture(scope="module")
def frames():
    files = list_images(MINI)[:3]
    return files, [read_image(p) for p in files]


def test_host_preprocessing_is_the_evaluators(frames):
    files, decoded = frames
    canvases = [letterbox_frame(f, 640) for f in decoded]
    chw = np.stack([preprocess(p, 640)[0] for p in files])
    out = np.empty((3, 3, 640, 640), np.float32)
    engine_input(canvases, np.dtype(np.float32), False, out)
    assert np.array_equal(out, to_input(chw))
    nhwc = np.empty((3, 640, 640, 3), np.uint8)
    engine_input(canvases, np.dtype(np.uint8), True, nhwc)
    assert np.array_equal(nhwc, chw.transpose(0, 2, 3, 1))
    nchw = np.empty((3, 3, 640, 640), np.uint8)
    engine_input(canvases, np.dtype(np.uint8), False, nchw)
    assert np.array_equal(nchw, chw)


def test_cpu_nms_matches_the_evaluator_on_real_outputs(frames):
    import onnxruntime as ort

    files, _ = frames
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"images": to_input(np.stack([preprocess(p, 640)[0] for p in files]))})[0]
    got = raw_detections(raw, Thresholds())
    for i in range(len(files)):
        want = postprocess(raw[i], 0.001, 0.7, 300)
        assert len(want) > 0 and np.array_equal(got[i], want)


def row(name, precision, profile, kind, total, infer, loop, resident, map50_95=None):
    samples = {s: [1.0] for s in ("letterbox", "normalise", "h2d", "d2h", "nms", "nms_deploy")}
    r = summarise({**samples, "infer": [infer, infer], "total": [total, total * 3]}, 32)
    return {"name": name, "precision": precision, "profile": profile, "kind": kind, "level": 3, **r,
            "loop_ips": loop, "resident_ips": resident, "map50_95": map50_95}


def test_speedups_pair_same_kind_and_profile():
    rows = [row("fp16", "fp16", "b32", "raw", 10.0, 3.0, 1000.0, 9000.0),
            row("int8", "int8-qdq", "b32", "raw", 8.0, 2.0, 1100.0, 12000.0),
            row("fp16-e2e", "fp16", "b32", "end-to-end", 6.0, 3.2, 2000.0, 9500.0),
            row("int8-e2e", "int8-qdq", "b32", "end-to-end", 5.0, 2.4, 2600.0, 12500.0, 0.36617),
            row("int8-b1", "int8-qdq", "b1", "raw", 1.0, 0.5, 500.0, 800.0)]  # no FP16 at b1: no ratio
    s = {(x["name"], x["versus"]): x for x in speedups(rows)}
    assert set(s) == {("int8", "fp16"), ("int8-e2e", "fp16-e2e")}
    assert s[("int8", "fp16")]["total_speedup"] == 1.25 and s[("int8", "fp16")]["infer_speedup"] == 1.5
    assert s[("int8-e2e", "fp16-e2e")]["loop_speedup"] == 1.3
    assert rows[0]["total_p50"] == 20.0 and rows[0]["ms_per_image"] == 0.625 and rows[0]["total_p99"] > 20
    text = markdown({"model": "yolo11n", "utc": "now", "environment": {"gpu": "G", "trt_version": "8.6",
                     "host_cpus": 2}, "frames": 3, "images": 32, "imgsz": 640, "thresholds": vars(Thresholds()),
                     "streams": 2, "rows": rows, "speedups": speedups(rows)})
    assert "| int8-e2e | end-to-end | b32 | 1.20x | 1.33x | 1.30x | 1.32x |" in text
    scored = [line for line in text.splitlines() if line.startswith("| int8-e2e | end-to-end | b32 | 3 |")]
    assert scored[0].endswith("| 0.3662 |") and all(line.endswith("| - |") for line in text.splitlines()
                                                      if line.startswith("| fp16 | raw |"))


def test_help_and_no_tensorrt_is_one_line():
    res = run_tool("tools.e2e", "--help")
    assert res.returncode == 0 and "whole loop" in res.stdout


def test_without_tensorrt_make_e2e_says_so_in_one_line():
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    res = run_tool("tools.e2e", "recipes/fp16.yaml", "--eval-dir", str(MINI))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "needs TensorRT" in res.stderr
