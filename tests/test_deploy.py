"""The end-to-end graph (recipe key `deploy`, tools/deploy_graph.py) on yolo11n: the preprocessing fold leaves ONNX
Runtime's outputs and the model's weights as they were, the NMS graph is what TensorRT's EfficientNMS_TRT takes, its
outputs decode, the pipeline keys and builds it (committed keys untouched), and trtexec's shapes follow its layout."""
import json

import numpy as np
import onnx
import pytest
from conftest import CALIB, MINI, MODEL, REPO, run_tool

import tools.core.setup as setup_mod
import tools.pipeline as pipeline
from tools.core.errors import UserError
from tools.core.files import list_images
from tools.core.recipe import Deploy, load
from tools.deploy_graph import FLOAT_INPUT, NMS_OUTPUTS, PLUGIN, add_nms, decode_nms, end_to_end, fold_input
from tools.yolo.preprocess import preprocess, to_input

FP16 = REPO / "recipes/fp16.yaml"
E2E = REPO / "recipes/fp16-e2e.yaml"


@pytest.fixture(scope="module")
def pixels():
    return np.stack([preprocess(p)[0] for p in list_images(MINI)[:4]])  # uint8 NCHW RGB, letterboxed


def session(model):
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_fold_gives_the_same_outputs_on_uint8_pixels(pixels, layout):
    raw = session(MODEL).run(None, {"images": to_input(pixels)})[0]
    folded = fold_input(onnx.load(str(MODEL)), layout)
    onnx.checker.check_model(folded, full_check=True)
    s = session(folded)
    (inp,) = s.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    assert inp.shape == (["batch", "height", "width", 3] if layout == "nhwc" else ["batch", 3, "height", "width"])
    feed = np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)) if layout == "nhwc" else pixels
    out = s.run(None, {"images": feed})[0]
    assert out.shape == raw.shape == (4, 84, 8400)
    np.testing.assert_allclose(out, raw, rtol=0, atol=1e-5)


def test_fold_leaves_every_weight_and_node_of_the_model():
    """What makes the Q/DQ scales of a folded quantized model the raw recipe's: nothing of the source is rewritten."""
    src = onnx.load(str(MODEL))
    folded = fold_input(onnx.load(str(MODEL)), "nhwc")
    init = {i.name: i.SerializeToString() for i in folded.graph.initializer}
    assert all(init[i.name] == i.SerializeToString() for i in src.graph.initializer)
    assert set(init) - {i.name for i in src.graph.initializer} == {"/deploy/255"}
    new = [n for n in folded.graph.node if n.name.startswith("/deploy/")]
    assert [n.op_type for n in new] == ["Cast", "Div", "Transpose"] and folded.graph.node[:3] == new
    old = [n for n in folded.graph.node if not n.name.startswith("/deploy/")]
    renamed = [[FLOAT_INPUT if i == "images" else i for i in n.input] for n in src.graph.node]
    assert [list(n.input) for n in old] == renamed and FLOAT_INPUT in old[0].input
    with pytest.raises(UserError, match="no float32 input 'images'"):  # folding twice is refused
        fold_input(folded, "nhwc")


@pytest.fixture(scope="module")
def nms_model():
    return end_to_end(onnx.load(str(MODEL)), Deploy(input="uint8-nhwc", nms={"conf": 0.001, "iou": 0.7,
                                                                              "max_det": 300}))


def test_nms_graph_is_what_efficientnms_takes(nms_model):
    from onnx import TensorProto, helper

    g = nms_model.graph
    (plugin,) = [n for n in g.node if n.op_type == PLUGIN]
    assert plugin.domain == "" and list(plugin.output) == list(NMS_OUTPUTS)
    attrs = {a.name: helper.get_attribute_value(a) for a in plugin.attribute}
    types = {a.name: a.type for a in plugin.attribute}
    assert attrs == {"background_class": -1, "box_coding": 1, "iou_threshold": pytest.approx(0.7),
                     "max_output_boxes": 300, "score_activation": 0, "score_threshold": pytest.approx(0.001),
                     "class_agnostic": 0}
    assert types["iou_threshold"] == types["score_threshold"] == onnx.AttributeProto.FLOAT
    assert all(types[k] == onnx.AttributeProto.INT for k in attrs if not k.endswith("threshold"))
    outs = {o.name: (o.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim])
            for o in g.output}
    assert outs == {"num_dets": (TensorProto.INT32, ["batch", 1]), "det_boxes": (TensorProto.FLOAT, ["batch", 300, 4]),
                    "det_scores": (TensorProto.FLOAT, ["batch", 300]), "det_classes": (TensorProto.INT32, ["batch", 300])}
    assert g.input[0].name == "images" and g.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert json.loads({p.key: p.value for p in nms_model.metadata_props}["deploy"])["nms"]["max_det"] == 300


def test_nms_inputs_are_the_heads_boxes_and_scores(pixels, nms_model):
    """Cut at the plugin, ONNX Runtime runs the rest: its boxes [N, A, 4] and scores [N, A, 80] are the raw head's
    rows 0-3 and 4-83, anchor by anchor."""
    from onnx import TensorProto, helper

    cut = onnx.ModelProto()
    cut.CopyFrom(nms_model)
    (plugin,) = [n for n in cut.graph.node if n.op_type == PLUGIN]
    cut.graph.node.remove(plugin)
    del cut.graph.output[:]
    cut.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in plugin.input)
    boxes, scores = session(cut).run(None, {"images": np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))})
    raw = session(MODEL).run(None, {"images": to_input(pixels)})[0]
    assert boxes.shape == (4, 8400, 4) and scores.shape == (4, 8400, 80)
    np.testing.assert_allclose(boxes, raw[:, :4].transpose(0, 2, 1), atol=1e-4)
    np.testing.assert_allclose(scores, raw[:, 4:].transpose(0, 2, 1), atol=1e-5)


def test_onnxruntime_refuses_the_nms_model_in_one_line(tmp_path, nms_model):
    path = tmp_path / "e2e.onnx"
    onnx.save(nms_model, str(path))
    res = run_tool("tools.evaluate", str(path), "--images", str(MINI), "--limit", "1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "EfficientNMS_TRT" in res.stderr and "ONNX Runtime cannot run" in res.stderr


def test_add_nms_refuses_a_model_without_the_raw_head(nms_model):
    with pytest.raises(UserError, match="expected one output"):
        add_nms(nms_model, 0.001, 0.7, 300)


def test_nms_outputs_decode_to_the_first_num_dets_rows():
    rng = np.random.default_rng(0)
    boxes = rng.random((3, 5, 4), dtype=np.float32) * 640
    scores = np.sort(rng.random((3, 5), dtype=np.float32), axis=1)[:, ::-1].astype(np.float16)  # an FP16 engine's
    classes = rng.integers(0, 80, (3, 5)).astype(np.int32)
    num = np.array([[2], [0], [5]], np.int32)
    dets = decode_nms(num, boxes, scores, classes)
    assert [d.shape for d in dets] == [(2, 6), (0, 6), (5, 6)] and all(d.dtype == np.float32 for d in dets)
    np.testing.assert_array_equal(dets[0][:, :4], boxes[0, :2])
    np.testing.assert_array_equal(dets[2][:, 4], scores[2].astype(np.float32))
    np.testing.assert_array_equal(dets[2][:, 5], classes[2])
    assert [len(d) for d in decode_nms(np.array([9, -1]), boxes[:2], scores[:2], classes[:2])] == [5, 0]


def test_an_nms_backend_is_filtered_at_the_evaluators_thresholds():
    """Backend.detect on an engine with NMS inside: the decoded rows, those above conf, at most max_det."""
    from tools.evaluate import Backend

    class Engine(Backend):
        def __init__(self):
            self.read_io(np.uint8, (-1, 640, 640, 3), NMS_OUTPUTS)

        def run(self, x):
            assert x.dtype == np.uint8 and x.shape == (2, 640, 640, 3)  # NHWC, as the engine takes it
            self.fed = x
            return {"num_dets": np.array([[3], [1]]), "det_boxes": np.ones((2, 4, 4), np.float32),
                    "det_scores": np.array([[0.9, 0.5, 0.2, 0], [0.3, 0, 0, 0]], np.float32),
                    "det_classes": np.array([[1, 2, 3, 0], [7, 0, 0, 0]], np.int32)}

    engine = Engine()
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 640, 640)).astype(np.uint8)
    dets = engine.detect(batch, conf=0.25, iou=0.7, max_det=1)
    np.testing.assert_array_equal(engine.fed, batch.transpose(0, 2, 3, 1))
    assert [d[:, 4].tolist() for d in dets] == [[pytest.approx(0.9)], [pytest.approx(0.3)]]
    assert [d[:, 5].tolist() for d in dets] == [[1.0], [7.0]]


def test_the_evaluator_scores_the_folded_model_like_the_raw_one(tmp_path, pixels):
    from tools.evaluate import OnnxrtBackend, predict

    path = tmp_path / "fold.onnx"
    onnx.save(fold_input(onnx.load(str(MODEL)), "nhwc"), str(path))
    files = list_images(MINI)[:6]
    folded, raw = OnnxrtBackend(path), OnnxrtBackend(MODEL)
    assert folded.uint8 and folded.nhwc and not folded.nms and not raw.uint8
    assert predict(folded, files, batch=3) == predict(raw, files, batch=3)


# ----------------------------------------------------------------------------------------------------------------
def setup(tmp_path):
    return setup_mod.Setup(calib_dir=CALIB, eval_dir=MINI, root=tmp_path, results=tmp_path / "runs",
                          trt_version="8.6.1")


def test_pipeline_builds_the_end_to_end_onnx_once_and_keys_it(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "gpu_name", lambda: "GPU A")
    raw, e2e = pipeline.Point(load(FP16), setup(tmp_path), "b1"), pipeline.Point(load(E2E), setup(tmp_path), "b1")
    assert raw.engine_onnx == raw.onnx == MODEL
    path = e2e.engine_onnx
    assert path.parent == tmp_path / "models/yolo11n/deploy" and path.name.startswith("yolo11n.e2e-")
    assert not path.exists()  # a Point only names it: making it is make_onnx's work
    with pytest.raises(UserError, match="not made yet; run its CPU stages first"):
        e2e.engine_key
    pipeline.make_onnx(e2e)
    mtime = path.stat().st_mtime_ns
    again = pipeline.Point(load(E2E), setup(tmp_path), "b1")
    pipeline.make_onnx(again)
    assert again.engine_onnx == path and path.stat().st_mtime_ns == mtime  # cached by content
    assert e2e.engine_key != raw.engine_key
    nchw = pipeline.Point(load(E2E).replace(deploy={"input": "uint8-nchw", "nms": {}}), setup(tmp_path), "b1")
    pipeline.make_onnx(nchw)
    assert nchw.engine_key not in (e2e.engine_key, raw.engine_key) and nchw.engine_onnx != path
    rec = e2e.fresh_record()
    assert rec["onnx"] == str(path.relative_to(tmp_path)) and rec["recipe"]["deploy"]["input"] == "uint8-nhwc"


def test_committed_engine_keys_are_unchanged(monkeypatch):
    """A recipe without `deploy` keys its engines as before: the committed fp16 record's key recomputes."""
    from tools.core.recipe import from_dict

    (path,) = sorted((REPO / "results/yolo11n/points").glob("fp16.b1.*.json"))
    rec = json.loads(path.read_text())
    monkeypatch.setattr(pipeline, "gpu_name", lambda: rec["gpu"])
    s = setup_mod.Setup(calib_dir=CALIB, eval_dir=MINI, trt_version=rec["trt_version"])
    assert "deploy" not in rec["recipe"] and "deploy" not in load(FP16).settings()
    assert pipeline.Point(from_dict(rec["recipe"]), s, "b1").engine_key == rec["engine_key"]
    assert load(E2E).replace(name="fp16", description=load(FP16).description, deploy=None) == load(FP16)


def test_trtexec_shapes_follow_the_input_layout():
    from tools.bench import bench_args
    from tools.engine import build_args
    from tools.trt_plan import plan

    r = load(E2E)
    args = build_args(r, "b32", plan(r, "8.6.1"), "m.onnx", "e.engine")
    assert "--minShapes=images:32x640x640x3" in args and "--maxShapes=images:32x640x640x3" in args
    nchw = r.replace(deploy={"input": "uint8-nchw"})
    assert "--optShapes=images:32x3x640x640" in build_args(nchw, "b32", plan(nchw, "8.6.1"), "m.onnx", "e.engine")
    assert "--optShapes=images:1x3x640x640" in build_args(load(FP16), "b1", plan(load(FP16), "8.6.1"), "m", "e")
    assert "--shapes=images:8x640x640x3" in bench_args("e.engine", 8, 640, False, 100, 1.0, "nhwc")


def test_deploy_key_is_validated_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(E2E.read_text().replace("input: uint8-nhwc", "input: float-nchw"))
    res = run_tool("tools.pipeline", "cpu", str(bad))
    assert res.returncode == 2 and "key `deploy.input`" in res.stderr and "uint8-nhwc | uint8-nchw" in res.stderr
    with pytest.raises(UserError, match="deploy needs precision fp16 or int8-qdq"):
        load(REPO / "recipes/int8-implicit.yaml").replace(deploy={})


def test_an_nms_engine_builds_without_library_tactics_on_tensorrt_8():
    """TensorRT 8.6 hands plugins cuBLAS/cuDNN handles (the devkit's stand-in libraries then refuse the build):
    an engine with EfficientNMS inside turns those tactic sources off there, and the fallback maps the flag onto the
    builder's bit mask as trtexec does."""
    from types import SimpleNamespace

    from tools.core.errors import UserError
    from tools.engine import NO_LIBRARY_TACTICS, build_args
    from tools.trt_plan import plan
    from tools.trtexec_py import parse_flags, tactic_mask

    r = load(E2E)
    flag = f"--tacticSources={NO_LIBRARY_TACTICS}"
    assert flag in build_args(r, "b1", plan(r, "8.6.1"), "m.onnx", "e.engine")
    assert flag not in build_args(r, "b1", plan(r, "10.13"), "m.onnx", "e.engine")
    assert flag not in build_args(load(FP16), "b1", plan(load(FP16), "8.6.1"), "m.onnx", "e.engine")
    folded = r.replace(deploy={"input": "uint8-nhwc"})  # the fold alone has no plugin
    assert flag not in build_args(folded, "b1", plan(folded, "8.6.1"), "m.onnx", "e.engine")
    assert parse_flags(["--onnx=m.onnx", flag])["tacticSources"] == NO_LIBRARY_TACTICS
    fake = SimpleNamespace(TacticSource=SimpleNamespace(CUBLAS=0, CUBLAS_LT=1, CUDNN=2, EDGE_MASK_CONVOLUTIONS=3))
    assert tactic_mask(fake, 0b1111, NO_LIBRARY_TACTICS) == 0b1000
    assert tactic_mask(fake, 0b1000, "+CUDNN") == 0b1100
    with pytest.raises(UserError, match="--tacticSources item 'CUDNN'.*CUBLAS"):
        tactic_mask(fake, 0, "CUDNN")
    with pytest.raises(UserError, match="item '-FOO'"):
        tactic_mask(fake, 0, "-FOO")
