"""Graph rewrites (recipe key `graph_rewrites`, tools/yolo/graph_rewrites.py) and engine I/O formats (`input_io_format`,
`output_io_format`) on yolo11n and real letterboxed images: each rewrite leaves ONNX Runtime's outputs as they were
and really changes the graph; ModelOpt quantizes the rewritten model with the same scales; a bad name is one line
naming the file; the settings are in the keys; the I/O formats map onto trtexec's flags, the fallback's parse and
the host's buffers (all without TensorRT)."""
import enum
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import CALIB, MINI, MODEL, REPO, run_tool

import tools.pipeline as pipeline
from tools.core.errors import UserError
from tools.core.files import list_images
from tools.core.layout import Layout
from tools.core.recipe import GRAPH_REWRITES, load
from tools.engine import build_args
from tools.yolo.graph_rewrites import apply, split_conv
from tools.yolo.preprocess import preprocess, to_input
from tools.trt_plan import plan
from tools.trtexec_py import apply_io_formats, buffer_shape, parse_flags, parse_io_formats

INT8 = REPO / "recipes/int8-dfl-mse.yaml"
FP16 = REPO / "recipes/fp16.yaml"
ATOL = 1e-5  # outputs are box pixels (0..640) and scores (0..1): 1e-5 absolute is at most 1e-5 relative to scores


@pytest.fixture(scope="module")
def images():
    return to_input(np.stack([preprocess(p)[0] for p in list_images(MINI)[:4]]))  # the repo's letterbox, /255


def outputs(model, x):
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


@pytest.fixture(scope="module")
def reference(images):
    return outputs(MODEL, images)


def splits_into_concat(model) -> int:
    """Concat inputs that are a Split's output (counted here, not with tools.graph_rewrites' own counter)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "Concat" for i in n.input
               if i in producer and producer[i].op_type == "Split")


def ops(model, op, prefix=""):
    return sum(1 for n in model.graph.node if n.op_type == op and n.name.startswith(prefix))


@pytest.mark.parametrize("rewrites", [["split-conv"], ["head-split"], ["split-conv", "head-split"]])
def test_rewrite_is_exact_in_onnxruntime(images, reference, rewrites):
    model = onnx.load(str(MODEL))
    apply(model, rewrites)
    onnx.checker.check_model(model, full_check=True)
    out = outputs(model, images)
    assert out.shape == reference.shape == (4, 84, 8400)
    np.testing.assert_allclose(out, reference, rtol=0, atol=ATOL)  # measured: bit-identical (max abs diff 0.0)


def test_split_conv_leaves_no_split_feeding_a_concat():
    model = onnx.load(str(MODEL))
    before = {op: ops(model, op) for op in ("Split", "Conv", "Sigmoid", "Mul")}
    # both halves into each C3k2 block's Concat (2, 4, 6, 8, 13, 16, 19, 22), C2PSA's (10) first half into its own
    assert splits_into_concat(model) == 2 * 8 + 1
    removed = apply(model, ["split-conv"])["split-conv"]
    assert sorted(removed) == sorted(f"/model.{k}/Split" for k in (2, 4, 6, 8, 10, 13, 16, 19, 22))
    assert splits_into_concat(model) == 0
    after = {op: ops(model, op) for op in before}
    assert after == {"Split": before["Split"] - 9, "Conv": before["Conv"] + 9, "Sigmoid": before["Sigmoid"] + 9,
                     "Mul": before["Mul"] + 9}
    conv0, conv1 = (next(n for n in model.graph.node if n.name == f"/model.2/cv1/conv/Conv_split{k}") for k in (0, 1))
    inits = {i.name: i for i in model.graph.initializer}
    assert conv0.input[0] == conv1.input[0] == "/model.1/act/Mul_output_0"  # both read the block's input
    assert [inits[c.input[1]].dims[0] for c in (conv0, conv1)] == [16, 16]
    assert "model.2.cv1.conv.weight" not in inits  # the unsliced weights are gone
    assert split_conv(model) == []  # nothing left to rewrite


def test_a_wrong_split_is_caught_by_the_comparison(images, reference):
    """The exactness check can fail: the two halves' weights swapped give other outputs, by far more than ATOL."""
    model = onnx.load(str(MODEL))
    apply(model, ["split-conv"])
    inits = {i.name: i for i in model.graph.initializer}
    a, b = inits["model.2.cv1.conv.weight_split0"], inits["model.2.cv1.conv.weight_split1"]
    a.name, b.name = b.name, a.name
    assert np.abs(outputs(model, images) - reference).max() > 1.0


def test_head_split_drops_the_concat_and_split_between_box_and_class(images, reference):
    model = onnx.load(str(MODEL))
    assert ops(model, "Split", "/model.23/") == 1
    head_concats = ops(model, "Concat", "/model.23/")
    apply(model, ["head-split"])
    assert ops(model, "Split", "/model.23/") == 0
    names = {n.name for n in model.graph.node}
    assert not names & {"/model.23/Concat", "/model.23/Concat_1", "/model.23/Concat_2", "/model.23/Concat_6"}
    assert {"/model.23/Concat_6_part0", "/model.23/Concat_6_part1"} <= names
    assert ops(model, "Concat", "/model.23/") < head_concats
    producer = {o: n for n in model.graph.node for o in n.output}
    sigmoid = next(n for n in model.graph.node if n.name == "/model.23/Sigmoid")
    assert producer[sigmoid.input[0]].name == "/model.23/Concat_6_part1"  # the class branch, straight from Concat
    assert apply(model, ["head-split"], "twice.onnx") == {"head-split": []}  # already in its form: nothing to do


def test_a_rewrite_that_leaves_its_target_is_one_line_naming_the_file():
    model = onnx.load(str(MODEL))
    sigmoid = next(n for n in model.graph.node if n.name == "/model.2/cv1/act/Sigmoid")
    sigmoid.op_type = "Tanh"  # no SiLU before model.2's Split: split-conv cannot rewrite it
    with pytest.raises(UserError, match=r"^odd\.onnx: graph rewrite 'split-conv' cannot rewrite 2 of the places"):
        apply(model, ["split-conv"], "odd.onnx")


def test_bad_rewrite_name_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(INT8.read_text() + "graph_rewrites: [split-convs]\n")
    res = run_tool("tools.trt_plan", str(bad))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(bad) in lines[0] and "graph_rewrites" in lines[0] and "split-conv, head-split" in lines[0]
    res = run_tool("tools.graph_rewrites", str(MODEL), str(tmp_path / "out.onnx"), "--rewrites", "fuse-all")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: {MODEL}: unknown graph rewrite(s) 'fuse-all'; known: {', '.join(GRAPH_REWRITES)}"]
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(UserError, match="precision fp16 or int8-qdq"):
        load(REPO / "recipes/int8-implicit.yaml").replace(graph_rewrites=["split-conv"])


def test_rewrites_are_in_the_keys_and_off_by_default(tmp_path):
    from tools.quantize import quantized_path

    base = load(INT8)
    split = load(REPO / "recipes/int8-dfl-mse-split.yaml")
    assert "graph_rewrites" not in base.settings() and "input_io_format" not in base.settings()  # old keys stay
    assert split.settings("quantize")["graph_rewrites"] == ["split-conv"]
    assert quantized_path(split.replace(name="x"), "fp32", tmp_path, "c") != \
        quantized_path(split.replace(name="x", graph_rewrites=["head-split"]), "fp32", tmp_path, "c")
    fp16 = load(FP16)
    assert fp16.replace(graph_rewrites=["split-conv"]).engine_settings("b1")["graph_rewrites"] == ["split-conv"]
    assert fp16.replace(input_io_format="fp16:chw").engine_settings("b1")["input_io_format"] == "fp16:chw"


def test_fp16_engine_starts_from_the_rewritten_model(tmp_path):
    setup = pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, root=tmp_path, results=tmp_path / "runs",
                           trt_version="8.6")
    plain = pipeline.Point(load(FP16), setup, "b1")
    fused = pipeline.Point(load(REPO / "recipes/fp16-fused.yaml"), setup, "b1")
    assert plain.engine_onnx == MODEL
    assert not fused.engine_onnx.is_file()  # named, not made: reading a Point does no work
    pipeline.make_onnx(fused)
    assert fused.engine_onnx.parent == Layout("yolo11n", tmp_path).quant and fused.engine_onnx.is_file()
    meta = json.loads(fused.engine_onnx.with_suffix(".json").read_text())
    assert meta["graph_rewrites"] == ["split-conv", "head-split"] and len(meta["removed"]["split-conv"]) == 9
    assert meta["nodes"] == {"before": 421, "after": len(onnx.load(str(fused.engine_onnx)).graph.node)}
    mtime = fused.engine_onnx.stat().st_mtime_ns
    pipeline.make_onnx(pipeline.Point(fused.recipe, setup, "b1"))  # made once
    assert fused.engine_onnx.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("recipe,flags", [
    ("int8-dfl-mse-fp16in", ["--inputIOFormats=fp16:chw"]), ("int8-dfl-mse-fp16out", ["--outputIOFormats=fp16:chw"]),
    ("int8-dfl-mse", []), ("fp16-fused", ["--inputIOFormats=fp16:chw"])])
def test_io_formats_map_onto_trtexec_flags_and_the_fallback(recipe, flags):
    r = load(REPO / f"recipes/{recipe}.yaml")
    args = build_args(r, "b1", plan(r, "8.6"), "m.onnx", "e.engine")
    assert [a for a in args if "IOFormats" in a] == flags
    opts = parse_flags(args)  # the fallback takes the very same command line
    assert {k: v for k, v in opts.items() if "IOFormats" in k} == dict(f[2:].split("=") for f in flags)
    strongly = plan(r, "11")
    assert not [a for a in build_args(r, "b1", strongly, "m.onnx", "e.engine") if "IOFormats" in a]
    assert bool(flags) == any("input_io_format/output_io_format ignored" in n for n in strongly.notes)


def test_fallback_parses_trtexec_io_format_spelling():
    assert parse_io_formats("inputIOFormats", "fp16:chw") == [("HALF", ("LINEAR",))]
    assert parse_io_formats("inputIOFormats", "int8:chw32,fp32:chw+hwc8") == [("INT8", ("CHW32",)),
                                                                              ("FLOAT", ("LINEAR", "HWC8"))]
    for bad in ("fp16", "half:chw", "fp16:nchw", "fp16:"):
        with pytest.raises(UserError, match="is not type:format"):
            parse_io_formats("inputIOFormats", bad)
    res = run_tool("tools.trtexec_py", f"--onnx={MODEL}", "--inputIOFormats=fp16:nchw")  # refused before TensorRT
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "'fp16:nchw'" in res.stderr


# the part of TensorRT's Python API apply_io_formats uses: DataType, TensorFormat (bit positions as in 8.6)
TRT_STUB = SimpleNamespace(DataType=enum.Enum("DataType", "FLOAT HALF INT8"), __version__="stub",
                           TensorFormat=enum.IntEnum("TensorFormat", {"LINEAR": 0, "CHW2": 1, "HWC8": 2, "CHW4": 3,
                                                                      "CHW16": 4, "CHW32": 5}))


def _network(inputs=1, outputs=1):
    ins, outs = ([SimpleNamespace(name=f"{kind}{i}", dtype=TRT_STUB.DataType.FLOAT, allowed_formats=None)
                  for i in range(count)] for kind, count in (("in", inputs), ("out", outputs)))
    return SimpleNamespace(num_inputs=inputs, num_outputs=outputs, get_input=ins.__getitem__,
                           get_output=outs.__getitem__), ins, outs


def test_fallback_sets_the_network_io_types_and_formats():
    trt = TRT_STUB
    network, ins, outs = _network()
    lines = apply_io_formats(trt, network, {"inputIOFormats": "fp16:chw", "outputIOFormats": "int8:chw32+chw4"}, False)
    assert (ins[0].dtype.name, ins[0].allowed_formats) == ("HALF", 1 << 0)
    assert (outs[0].dtype.name, outs[0].allowed_formats) == ("INT8", (1 << 5) | (1 << 3))
    assert len(lines) == 2
    network, ins, _ = _network()
    apply_io_formats(trt, network, {}, False)
    assert (ins[0].dtype.name, ins[0].allowed_formats) == ("FLOAT", None)  # no flag: left as the parser made it
    with pytest.raises(UserError, match="strongly typed network takes its types from the ONNX"):
        apply_io_formats(trt, _network()[0], {"inputIOFormats": "fp16:chw"}, True)
    network, ins, _ = _network()
    apply_io_formats(trt, network, {"inputIOFormats": "fp32:hwc8"}, True)  # same type: only the format changes
    assert (ins[0].dtype.name, ins[0].allowed_formats) == ("FLOAT", 1 << 2)
    with pytest.raises(UserError, match="gives 2 formats for 1 tensors"):
        apply_io_formats(trt, _network()[0], {"inputIOFormats": "fp16:chw,fp16:chw"}, False)
    with pytest.raises(UserError, match="has no CDHW32"):
        apply_io_formats(trt, _network()[0], {"inputIOFormats": "fp16:cdhw32"}, False)


def test_fallback_pads_a_vectorized_buffer_to_whole_vectors():
    """A CHW32 INT8 input of 3 channels holds 32 per pixel, as trtexec allocates it; a linear one its own shape,
    asking the engine nothing beyond its format."""
    linear = SimpleNamespace(get_tensor_format=lambda name: TRT_STUB.TensorFormat.LINEAR)
    assert buffer_shape(TRT_STUB, linear, "images", (2, 3, 640, 640)) == (2, 3, 640, 640)
    chw32 = SimpleNamespace(get_tensor_format=lambda name: TRT_STUB.TensorFormat.CHW32,
                            get_tensor_vectorized_dim=lambda name: 1, get_tensor_components_per_element=lambda n: 32)
    assert buffer_shape(TRT_STUB, chw32, "images", (2, 3, 640, 640)) == (2, 32, 640, 640)
    assert buffer_shape(TRT_STUB, chw32, "images", (1, 33, 20, 20)) == (1, 64, 20, 20)


def test_host_feeds_float16_where_the_engine_takes_it():
    """The runners read the engine's input type (get_tensor_dtype): float16 gets the float32 input rounded once,
    in tools.evaluate and in tools.e2e alike; float16 outputs widen exactly."""
    from tools.e2e import engine_input
    from tools.evaluate import Backend, widen

    pixels = np.stack([preprocess(p)[0] for p in list_images(MINI)[:2]])
    backend = Backend()
    backend.read_io(np.float16, (2, 3, 640, 640), ["output0"])
    fed = backend.feed(pixels)
    assert fed.dtype == np.float16 and np.array_equal(fed, to_input(pixels).astype(np.float16))
    backend.read_io(np.float32, (2, 3, 640, 640), ["output0"])
    assert backend.feed(pixels).dtype == np.float32
    canvases = [np.ascontiguousarray(p.transpose(1, 2, 0)[:, :, ::-1]) for p in pixels]  # back to BGR HWC
    host = np.empty((2, 3, 640, 640), np.float16)
    engine_input(canvases, np.dtype(np.float16), False, host)
    assert np.array_equal(host, fed)
    half = np.array([639.5, 0.25], np.float16)
    assert widen(half).dtype == np.float32 and np.array_equal(widen(half), half.astype(np.float32))


def test_io_formats_refused_where_the_engine_has_its_own():
    e2e = load(REPO / "recipes/int8-dfl-mse-e2e.yaml")
    with pytest.raises(UserError, match="leave input_io_format at fp32:chw"):
        e2e.replace(input_io_format="fp16:chw")
    with pytest.raises(UserError, match="leave output_io_format at fp32:chw"):
        e2e.replace(output_io_format="fp16:chw")
    with pytest.raises(UserError, match="input_io_format"):
        load(INT8).replace(input_io_format="int8:chw32")  # the host has no input scale to quantize with


# ----------------------------------------------------------------------------------------------------------------
# Through ModelOpt (4 calibration images): the rewritten model quantizes with the same scales
@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from tools.quantize import quantize

    root = tmp_path_factory.mktemp("root")
    base = load(INT8).replace(calib_images=4, qdq_rewrites=["concat"])
    plain = quantize(base, "8.6", CALIB, root=root)
    split = quantize(load(REPO / "recipes/int8-dfl-mse-split.yaml").replace(calib_images=4), "8.6", CALIB,
                     root=root)
    return plain, split


def test_split_conv_quantizes_with_the_same_scales_and_one_scale_per_concat(quantized, images):
    """(d) TensorRT's rules: the C3k2/C2PSA Concats of the rewritten model get every input at their output's
    scale; every activation scale is the one the exported model's tensor of that name gets (the Mul parts write
    the Split's tensors). The Q/DQ models then differ in one ModelOpt placement only: in the exported graph the
    Q/DQ that ModelOpt puts on C2PSA's Split output also feeds the attention's qkv conv (excluded, float), with
    split-conv that conv reads the float tensor. Wired as in the exported graph, the outputs are bit-identical."""
    from tools.quantize import activation_scales

    plain, split = quantized
    a, b = activation_scales(split), activation_scales(plain)
    assert set(a) == set(b) and all(a[k] == b[k] for k in a)
    meta = json.loads(split.with_suffix(".json").read_text())
    assert meta["settings"]["graph_rewrites"] == ["split-conv"] and len(meta["graph_rewrites"]["removed"]
                                                                          ["split-conv"]) == 9
    model = onnx.load(str(split))
    assert splits_into_concat(model) == 0
    producer = {o: n for n in model.graph.node for o in n.output}
    consumer = {i: n for n in model.graph.node for i in n.input}
    inits = {i.name: i for i in model.graph.initializer}
    for k in (2, 4, 6, 8, 10, 13, 16, 19, 22):
        concat = next(n for n in model.graph.node if n.name == f"/model.{k}/Concat")
        out_scale = inits[consumer[concat.output[0]].input[1]].raw_data
        assert all(producer[i].op_type == "DequantizeLinear" and inits[producer[i].input[1]].raw_data == out_scale
                   for i in concat.input), concat.name
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and
              n.input[0].startswith("/model.10/Split_output_1"))
    qkv = next(n for n in model.graph.node if n.name == "/model.10/m/m.0/attn/qkv/conv/Conv")
    assert qkv.input[0] == "/model.10/Split_output_1"
    qkv.input[0] = dq.output[0]
    np.testing.assert_array_equal(outputs(model, images), outputs(plain, images))
