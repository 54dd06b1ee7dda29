"""ModelOpt quantization for real (4 calibration images), the shared calibration cache, and Q/DQ bypassing."""
import json

import numpy as np
import onnx
import pytest
from conftest import CALIB, REPO

from tools.core.recipe import load
from tools.quantize import activation_scales, quantize
from tools.sensitivity import block_groups, bypass_qdq


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    recipe = load(REPO / "recipes/int8-qdq.yaml").replace(calib_images=4)
    path = quantize(recipe, "8.6", CALIB, root=root)
    return root, recipe, path


def test_quantized_model_and_record(quantized):
    root, recipe, path = quantized
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["high_precision_dtype"] == "fp32" and meta["settings"]["calib_images"] == 4
    assert meta["nodes"]["QuantizeLinear"] > 100 and meta["modelopt_version"]
    assert not any("/attn/" in n for n in meta["nodes"]["quantized"])  # the recipe keeps C2PSA attention in float
    assert "--calibration_cache_path" in meta["command"] and "--nodes_to_exclude" in meta["command"]


def test_scales_come_from_the_shared_calibration(quantized):
    root, recipe, path = quantized
    cache = next((root / "calib" / "yolo11n").glob("*.entropy-*.cache"))
    full = activation_scales(cache.with_suffix(".full.onnx"))
    ours = activation_scales(path)
    shared = set(full) & set(ours)
    assert len(shared) > 50
    for k in shared:
        assert ours[k] == pytest.approx(full[k], rel=1e-6)


def test_second_exclusion_set_reuses_the_calibration(quantized):
    root, recipe, _ = quantized
    logs = lambda: sorted((root / "logs" / "yolo11n").glob("*.calibrate.log"))  # noqa: E731
    before = logs()
    other = recipe.replace(name="head", nodes_to_exclude=list(recipe.nodes_to_exclude) + [r".*\.2/Conv$"])
    path = quantize(other, "8.6", CALIB, root=root)
    assert logs() == before  # no second ModelOpt calibration
    quantized_nodes = json.loads(path.with_suffix(".json").read_text())["nodes"]["quantized"]
    assert not any(n.endswith(".2/Conv") for n in quantized_nodes)


def test_bypass_puts_one_block_back_in_float(quantized):
    import onnxruntime as ort

    _, _, path = quantized
    model = onnx.load(str(path))
    groups = block_groups([n.name for n in model.graph.node])
    assert "model.0" in groups and any(g.startswith("head-dfl") for g in groups)
    float0 = bypass_qdq(model, groups["model.0"])
    producer = {o: n.op_type for n in float0.graph.node for o in n.output}
    conv0 = next(n for n in float0.graph.node if n.name == "/model.0/conv/Conv")
    assert all(producer.get(i) != "DequantizeLinear" for i in conv0.input)
    conv1 = next(n for n in float0.graph.node if n.name == "/model.1/conv/Conv")
    assert producer[conv1.input[0]] == "DequantizeLinear"  # other blocks untouched
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    out = ort.InferenceSession(float0.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    assert out[0].shape == (1, 84, 8400)


PROFILE = REPO / "results" / "yolo11n" / "profile" / "b32-L3" / "by-block.csv"


def test_every_block_group_has_its_cost_in_the_per_layer_profile(quantized):
    """The latency-aware proposal reads each group's cost from `make profile`'s by-block table: the names must meet."""
    from tools.sensitivity import block_costs, layers_block

    _, _, path = quantized
    groups = block_groups([n.name for n in onnx.load(str(path)).graph.node])
    costs = block_costs(PROFILE, "int8-qdq")
    assert {layers_block(g) for g in groups} <= set(costs)
    assert layers_block("head-dfl (model.23.dfl)") == "model.23/dfl" and layers_block("model.7") == "model.7"


def test_latency_order_takes_free_blocks_first_then_gain_per_ms():
    from tools.sensitivity import block_costs, latency_order

    costs = block_costs(PROFILE, "int8-qdq")
    free = [b for b, ms in costs.items() if ms <= 0 and "/" not in b][:2]
    paid = sorted((b for b, ms in costs.items() if ms > 0.01 and "/" not in b), key=costs.get)[:2]
    gains = {free[0]: 0.001, free[1]: 0.002, paid[0]: 0.01, paid[1]: 0.011, "model.99": -0.01}
    order = latency_order(gains, costs)
    assert order[:2] == [free[1], free[0]] and "model.99" not in order  # free by gain; harmful blocks never
    ratio = {b: gains[b] / costs[b] for b in paid}
    assert order[2:] == sorted(paid, key=ratio.get, reverse=True)


def test_profile_without_the_recipe_column_is_a_one_line_error(tmp_path):
    from tools.core.errors import UserError
    from tools.sensitivity import block_costs

    bad = tmp_path / "by-block.csv"
    bad.write_text("block,ms_fp16\nmodel.0,0.1\n")
    with pytest.raises(UserError, match="ms_int8-qdq"):
        block_costs(bad, "int8-qdq")
    with pytest.raises(UserError, match="make profile"):
        block_costs(tmp_path / "missing.csv", "int8-qdq")


def test_concat_rewrite_is_exact_and_gives_concats_one_scale(quantized):
    """`qdq_rewrites: [concat]` through the quantize step: every input of a quantized Concat carries the output's
    scale, ONNX Runtime computes the same detections bit for bit, and the plain model keeps its key and bytes."""
    import onnxruntime as ort

    from conftest import MINI
    from tools.yolo.preprocess import preprocess, to_input
    from tools.yolo.qdq_rules import quantize_concat_inputs

    root, recipe, plain = quantized
    path = quantize(recipe.replace(name="concat", qdq_rewrites=["concat"]), "8.6", CALIB, root=root)
    assert path != plain and "qdq_rewrites" not in recipe.settings("quantize")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert len(meta["qdq_rewrites"]["concat"]) >= 10  # every C3k2 block and the neck's Concats
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    consumer = {i: n for n in model.graph.node for i in n.input}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for name in meta["qdq_rewrites"]["concat"]:
        concat = next(n for n in model.graph.node if n.name == name)
        out_scale = inits[consumer[concat.output[0]].input[1]]
        for i in concat.input:
            assert producer[i].op_type == "DequantizeLinear" and inits[producer[i].input[1]] == out_scale
    assert quantize_concat_inputs(model) == []  # nothing left to rewrite
    images = sorted((MINI / "images").iterdir())[:2]
    x = to_input(np.stack([preprocess(p, 640)[0] for p in images]))
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]  # noqa: E731
    assert np.array_equal(run(plain), run(path))


def test_layer_groups_are_the_nodes_reading_quantized_activations(quantized):
    """`--unit layer`: one group per node fed through a Q/DQ pair; bypassing one leaves its neighbours quantized."""
    from tools.sensitivity import layer_groups

    _, _, path = quantized
    model = onnx.load(str(path))
    groups = layer_groups(model)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]  # (an excluded node may still read an
    # activation ModelOpt quantized for its other consumers: it is a group too)
    assert set(c for c in convs if "/attn/" not in c) <= set(groups)  # the recipe keeps C2PSA's attention in float
    assert {n.op_type for n in model.graph.node if n.name in groups} <= {"Conv", "Add", "Concat", "MaxPool", "Resize"}
    floated = bypass_qdq(model, groups["/model.1/conv/Conv"])
    producer = {o: n.op_type for n in floated.graph.node for o in n.output}
    node = {n.name: n for n in floated.graph.node}
    assert producer[node["/model.1/conv/Conv"].input[0]] != "DequantizeLinear"
    assert producer[node["/model.0/conv/Conv"].input[0]] == "DequantizeLinear"
    assert producer[node["/model.2/cv1/conv/Conv"].input[0]] == "DequantizeLinear"


def test_layer_costs_come_from_the_per_layer_tables(quantized):
    """A conv's cost is its TensorRT layer's time in the FP16 engine minus in the INT8 one, read off the CSVs."""
    import csv

    from tools.sensitivity import layer_costs, layer_groups

    _, _, path = quantized
    groups = layer_groups(onnx.load(str(path)))
    costs = layer_costs(PROFILE, "int8-qdq", groups)
    assert set(costs) == set(groups)

    def layer_ms(engine: str, node: str) -> float:
        rows = csv.DictReader(open(PROFILE.parent / f"{engine}.layers.csv"))
        return sum(float(r["ms"]) for r in rows if node in r["onnx_nodes"].split())
    for node in ("/model.0/conv/Conv", "/model.2/cv2/conv/Conv", "/model.22/cv1/conv/Conv"):
        assert costs[node] == pytest.approx(layer_ms("fp16", node) - layer_ms("int8-qdq", node), abs=1e-9)
    assert sum(costs.values()) < sum(float(r["ms_fp16"]) for r in csv.DictReader(open(PROFILE)) if r["block"] != "all")


def test_layer_costs_without_the_layer_tables_is_a_one_line_error(tmp_path):
    from tools.core.errors import UserError
    from tools.sensitivity import layer_costs

    (tmp_path / "by-block.csv").write_text("block,ms_fp16,ms_int8-qdq\nmodel.0,0.1,0.05\n")
    with pytest.raises(UserError, match=r"fp16\.layers\.csv.*make profile"):
        layer_costs(tmp_path / "by-block.csv", "int8-qdq", ["/model.0/conv/Conv"])
    with pytest.raises(UserError, match="ms_int8-dfl-mse"):  # layer tables beside a comparison without the recipe
        layer_costs(tmp_path / "by-block.csv", "int8-dfl-mse", ["/model.0/conv/Conv"])
