"""The TensorRT 10/11 flavour of a Q/DQ model (ModelOpt high precision fp16), made for real on 4 calibration images:
ONNX Runtime's float16 QuantizeLinear truncation (why the flavour scored near zero), the flavour run as ONNX Runtime
should run it detecting what the FP32 flavour detects, and no FP16 weight scale left subnormal."""
import json

import numpy as np
import onnx
import pytest
from conftest import CALIB, MINI, REPO
from onnx import TensorProto, helper, numpy_helper

from tools.core.files import list_images
from tools.core.recipe import load
from tools.quantize import quantize
from tools.yolo.decode import postprocess
from tools.yolo.preprocess import preprocess, to_input
from tools.yolo.qdq_fp16 import FP16_MIN_NORMAL, for_onnxruntime, fp32_quantize, onnxruntime_truncates_fp16_quantize, \
    weight_scale_names


def session(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def flavours(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    recipe = load(REPO / "recipes/int8-ultralytics.yaml").replace(calib_images=4)
    return {hp: quantize(recipe, trt, CALIB, root=root) for hp, trt in (("fp16", "10"), ("fp32", "8.6"))}


def test_float32_quantize_rounds_to_nearest_even():
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [6])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [6])],
        [numpy_helper.from_array(np.array(0.5, np.float16), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    x = np.array([1.3, -1.3, 0.75, -0.75, 100.0, 0.2], np.float16)  # / 0.5: 2.6, -2.6, 1.5, -1.5, 200, 0.4
    assert session(fp32_quantize(model)).run(None, {"x": x})[0].tolist() == [3, -3, 2, -2, 127, 0]
    truncated = session(model).run(None, {"x": x})[0].tolist() == [2, -2, 1, -1, 127, 0]
    assert truncated == onnxruntime_truncates_fp16_quantize()


def test_no_fp16_weight_scale_is_subnormal(flavours):
    model = onnx.load(str(flavours["fp16"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = [inits[n] for n in weight_scale_names(model)]
    assert len(scales) > 100 and all(s.dtype == np.float16 and s.min() >= FP16_MIN_NORMAL for s in scales)
    raised = json.loads(flavours["fp16"].with_suffix(".json").read_text())["fp16_weight_scales_raised"]
    # YOLO11n's one all-but-zero weight channel: C2PSA's qkv conv, FP32 scale ~3e-11, FP16 subnormal 6e-8
    assert {r["scale"].rsplit("_", 1)[0] for r in raised} == {"model.10.m.0.attn.qkv.conv.weight_scale"}
    assert all(v < FP16_MIN_NORMAL for r in raised for v in r["values"])


def _iou(a, b):
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda d: np.prod(d[:, 2:4] - d[:, :2], axis=1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_fp16_flavour_detects_what_the_fp32_flavour_detects(flavours):
    x = to_input(np.stack([preprocess(p)[0] for p in list_images(MINI)[:3]]))
    fp16 = onnx.load(str(flavours["fp16"]))
    ref = session(onnx.load(str(flavours["fp32"]))).run(None, {"images": x})[0]
    out = session(for_onnxruntime(fp16)).run(None, {"images": x})[0]
    if onnxruntime_truncates_fp16_quantize():
        # the symptom, and that truncation alone explains it: scores collapse without the float32 QuantizeLinear
        assert session(fp16).run(None, {"images": x})[0][:, 4:].max() < 0.05
    assert out[:, 4:].max() > 0.8 and abs(out[:, 4:].max() - ref[:, 4:].max()) < 0.05
    for r, o in zip(ref, out):
        confident, candidates = postprocess(r), postprocess(o)
        confident, candidates = confident[confident[:, 4] >= 0.4], candidates[candidates[:, 4] >= 0.2]
        assert len(confident) >= 3
        same_class = confident[:, None, 5] == candidates[None, :, 5]
        assert ((_iou(confident, candidates) * same_class).max(axis=1) >= 0.75).all()


def test_the_pipelines_onnxrt_score_of_the_fp16_flavour_does_not_collapse(flavours):
    """tools.evaluate (the onnxrt stage, `make onnxrt`) runs the FP16 flavour as ONNX Runtime should: it scores
    close to the FP32 flavour instead of near zero."""
    from tools.evaluate import evaluate

    fp16, fp32 = (evaluate(flavours[hp], MINI, batch=8, limit=8, workers=1)["map50_95"] for hp in ("fp16", "fp32"))
    assert fp32 > 0.2 and abs(fp16 - fp32) < 0.05, (fp16, fp32)


def test_two_machines_make_the_same_bytes(flavours, tmp_path):
    """ModelOpt lists the FP16 flavour's value_info in a different order from run to run; the quantize step sorts
    them, so a fresh checkout makes a byte-identical model (and the same engine key)."""
    import hashlib

    recipe = load(REPO / "recipes/int8-ultralytics.yaml").replace(calib_images=4)
    again = quantize(recipe, "10", CALIB, root=tmp_path)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert again.name == flavours["fp16"].name and digest(again) == digest(flavours["fp16"])
