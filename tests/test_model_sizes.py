"""YOLO11 s and m from ultralytics' own model .yaml (random weights): what tools derive from their graphs, and that
the recipes written against yolo11n's node names hold on them.

The models are exported once per module at a small image size: node names do not depend on it, and the export
stays dynamic (batch/height/width) whatever the size.
"""
import re

import numpy as np
import onnx
import pytest
from conftest import MODEL, REPO, run_tool
from onnx import TensorProto, helper

from tools.core.errors import UserError
from tools.core.recipe import load
from tools.engine import onnx_nodes, resolve_layer_precisions
from tools.export import check_detector, check_target, export_pt, load_model
from tools.sensitivity import block_groups
from tools.yolo import graph as yolo_graph

SIZES = ("yolo11s", "yolo11m")
IMGSZ = 64


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    paths = {}
    for size in SIZES:
        paths[size] = out / f"{size}.onnx"
        assert export_pt(f"{size}.yaml", paths[size], imgsz=IMGSZ) < 1e-3
    return paths


@pytest.fixture(scope="module")
def graphs(exports):
    return {size: (yolo_graph.describe(onnx.load(str(p)), p), [n.name for n in onnx.load(str(p)).graph.node])
            for size, p in exports.items()}


@pytest.mark.parametrize("size", SIZES)
def test_facts_derived_from_the_graph(exports, graphs, size):
    import onnxruntime as ort

    g, _ = graphs[size]
    assert g.blocks == tuple(range(24)) and g.head == 23 and g.attention == (10,)
    assert g.input_name == "images" and g.classes == 80
    assert g.input == ["batch", 3, "height", "width"] and g.imgsz is None and g.anchors is None  # dynamic, as shipped
    assert g.branches == {"box": r"^/model\.23/cv2\.", "cls": r"^/model\.23/cv3\.", "dfl": r"^/model\.23/dfl/"}
    session = ort.InferenceSession(str(exports[size]), providers=["CPUExecutionProvider"])
    for batch, side in ((1, IMGSZ), (2, 2 * IMGSZ)):  # the anchors follow strides 8/16/32 at any input size
        out = session.run(None, {g.input_name: np.zeros((batch, 3, side, side), np.float32)})[0]
        assert out.shape == (batch, 4 + g.classes, yolo_graph.anchor_count(side))
    assert yolo_graph.anchor_count(640) == 8400


@pytest.mark.parametrize("size", SIZES)
def test_random_weights_are_marked(exports, size):
    assert yolo_graph.is_random_weights(exports[size])
    meta = {p.key: p.value for p in onnx.load(str(exports[size])).metadata_props}
    assert meta["weights"] == f"random (ultralytics {size}.yaml, seed 0) - speed only, no accuracy"
    assert "date" not in meta and check_detector(exports[size])["random_weights"]
    assert not yolo_graph.is_random_weights(MODEL)  # the shipped, trained yolo11n


def test_export_is_byte_identical_and_modelopt_leaves_it_so(exports, tmp_path):
    again = tmp_path / "again.onnx"
    export_pt("yolo11s.yaml", again, imgsz=IMGSZ)
    assert again.read_bytes() == exports["yolo11s"].read_bytes()
    onnx.shape_inference.infer_shapes_path(str(again))  # what ModelOpt does, in place, to the model it quantizes
    assert again.read_bytes() == exports["yolo11s"].read_bytes()


@pytest.mark.parametrize("size", SIZES)
def test_one_recipe_file_serves_every_size(size):
    """A configuration is one file for every size: the size (MODEL=, --model) picks the model and changes nothing
    else; the shipped ones name no model (a recipe for one size only would say so with `model:`)."""
    paths = sorted((REPO / "recipes").glob("*.yaml"))
    assert {"fp16", "int8-qdq", "int8-implicit", "int8-dfl-mse", "int8-dfl-mse-split"} <= {p.stem for p in paths}
    for path in paths:
        n, s = load(path, "yolo11n"), load(path, size)
        assert s.model == size and s.onnx_path == REPO / "models/yolo11" / f"{size}.onnx"
        assert s.replace(model="yolo11n") == n and load(path) == n  # without a size: yolo11n, as before


def test_speed_grids_time_the_references_as_yolo11n_does():
    from tools.core.grid import expand, load_grid

    n = load_grid(REPO / "recipes/grids/yolo11n.yaml")
    for size in SIZES:
        grid = load_grid(REPO / f"recipes/grids/{size}.yaml")
        assert grid.model == size and grid.bench == n.bench
        names = [r.name for r in expand(grid)]  # FP16 and the base at least: the size table's comparison
        assert names[:2] == ["fp16", "int8-qdq"] and set(names) <= {r.name for r in n.references}
        assert all(r.model == size for r in expand(grid))


@pytest.mark.parametrize("size", SIZES)
def test_recipe_regexes_match_the_graph(exports, graphs, size):
    g, names = graphs[size]
    recipes = [load(p, size) for p in sorted((REPO / "recipes").glob("*.yaml"))]
    for r in recipes:
        for pattern in r.nodes_to_exclude:  # ModelOpt applies them with re.match
            hits = [n for n in names if re.match(pattern, n)]
            assert hits, f"{r.name}: {pattern} matches no node of {size}"
            blocks = {yolo_graph.block_of(n) for n in hits}
            assert blocks <= {g.head} or blocks == set(g.attention), (pattern, blocks)
    implicit = next(r for r in recipes if r.precision == "int8-implicit")
    chosen = resolve_layer_precisions(implicit, onnx_nodes(exports[size]))  # raises if a rule matches nothing
    fp16 = sorted(n for n, p in chosen.items() if p == "fp16")
    assert "/model.23/dfl/conv/Conv" in fp16 and len(fp16) == 7  # 3 x cv2 ".2/Conv" + 3 x cv3 + DFL
    assert all(yolo_graph.block_of(n) == g.head for n in chosen)


@pytest.mark.parametrize("size", SIZES)
def test_sensitivity_groups_follow_the_graph(graphs, size):
    g, names = graphs[size]
    groups = block_groups(names)
    assert [k for k in groups if k.startswith("model.")] == [f"model.{k}" for k in range(23)]
    assert {k: v for k, v in groups.items() if k.startswith("head-")} == {
        "head-box (model.23.cv2)": g.branches["box"], "head-cls (model.23.cv3)": g.branches["cls"],
        "head-dfl (model.23.dfl)": g.branches["dfl"]}
    assert all(any(re.search(rx, n) for n in names) for rx in groups.values())
    with pytest.raises(UserError, match="no YOLO11 Detect head"):
        block_groups([n for n in names if "/dfl/" not in n])


def fake_detector(path, with_head: bool):
    """[N,3,640,640] -> [N,84,8400] with YOLO-like node names; `with_head` adds a Detect block's names."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 640, 640])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 84, 8400])
    names = ["/model.0/conv/Conv", "/model.1/Relu"]
    if with_head:
        names += [f"/model.2/{cv}.{i}/Relu" for i in range(3) for cv in ("cv2", "cv3")] + ["/model.2/dfl/Relu"]
    edges = ["images"] + [f"t{i}" for i in range(len(names) - 1)] + ["output0"]
    nodes = [helper.make_node("Relu", [a], [b], name=n) for n, a, b in zip(names, edges, edges[1:])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "fake", [x], [y])), path)
    return path


def test_detector_shaped_model_without_a_detect_head_is_refused(tmp_path):
    fake = fake_detector(tmp_path / "fake.onnx", with_head=False)
    with pytest.raises(UserError, match="not a YOLO11 detector"):
        check_detector(fake)
    res = run_tool("tools.export", "--onnx", str(fake))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and str(fake) in res.stderr
    assert "not a YOLO11 detector" in res.stderr and "Traceback" not in res.stderr
    assert check_detector(fake_detector(tmp_path / "head.onnx", with_head=True))["head"] == 2


def test_classifiers_are_refused(tmp_path):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 224, 224])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 1000])
    node = helper.make_node("GlobalAveragePool", ["images"], ["output0"], name="/model.10/pool/GlobalAveragePool")
    onnx.save(helper.make_model(helper.make_graph([node], "cls", [x], [y])), tmp_path / "cls.onnx")
    with pytest.raises(UserError, match="not a YOLO detector"):
        check_detector(tmp_path / "cls.onnx")
    with pytest.raises(UserError, match="a classify model, not a detector"):
        load_model("yolo11n-cls.yaml", seed=0)  # refused before any export work


def test_exports_never_overwrite_another_model(tmp_path):
    with pytest.raises(UserError, match=r"write it to .*yolo11s\.onnx \(make export MODEL=yolo11s"):
        check_target("yolo11s", tmp_path / "yolo11n.onnx", random=True)  # make export PT=yolo11s.pt, MODEL unset
    trained = tmp_path / "yolo11n.onnx"
    trained.write_bytes(MODEL.read_bytes())
    with pytest.raises(UserError, match="holds trained weights"):
        check_target("yolo11n", trained, random=True)
    check_target("yolo11n", trained, random=False)  # re-exporting a trained checkpoint is fine
    with pytest.raises(UserError, match="make export MODEL=yolo11m PT=yolo11m.pt"):
        check_detector(tmp_path / "yolo11m.onnx")


def test_static_size_must_match_the_strides():
    assert yolo_graph.static_size([1, 3, 640, 640], [1, 84, 8400], "m.onnx") == (640, 8400)
    assert yolo_graph.static_size(["batch", 3, "height", "width"], ["batch", 84, "anchors"], "m.onnx") == (None, None)
    with pytest.raises(UserError, match="8000 anchors for a 640x640 input, YOLO11 has 8400"):
        yolo_graph.static_size([1, 3, 640, 640], [1, 84, 8000], "m.onnx")


def test_stem_grid_leaves_only_the_first_convolution_in_float(exports, graphs):
    """recipes/grids/yolo11m-stem.yaml adds to int8-qdq's exclusions one regex, and it names the convolution that
    reads the images, nothing else (the images' Q/DQ goes with it)."""
    from tools.core.grid import expand, load_grid

    g, _ = graphs["yolo11m"]
    points = {p.name: p for p in expand(load_grid(REPO / "recipes/grids/yolo11m-stem.yaml", REPO))}
    base, stem = points["int8-qdq"].nodes_to_exclude, points["qdq-x-fp16-stem"].nodes_to_exclude
    added = [rx for rx in stem if rx not in base]
    assert added and set(base) < set(stem)
    nodes = onnx.load(str(exports["yolo11m"])).graph.node
    hits = [n for n in nodes if any(re.match(rx, n.name) for rx in added)]
    assert [(n.op_type, n.input[0]) for n in hits] == [("Conv", g.input_name)]


@pytest.mark.parametrize("size", SIZES)
def test_graph_rewrites_hold_on_the_larger_models(exports, size):
    """split-conv finds yolo11s's and yolo11m's blocks too (their C3k2 blocks 6 and 8 use C3k bottlenecks, as
    yolo11n's do), head-split finds their head in its form already (ultralytics 8.4 exports box and class apart), and
    ONNX Runtime's outputs stay as they were, on a real letterboxed image."""
    import onnxruntime as ort

    from tools.core.files import list_images
    from tools.yolo.graph_rewrites import apply
    from tools.yolo.preprocess import preprocess, to_input

    x = to_input(preprocess(list_images(REPO / "data/coco-mini")[0], IMGSZ)[0][None])
    model = onnx.load(str(exports[size]))
    removed = apply(model, ["split-conv", "head-split"])
    assert len(removed["split-conv"]) == 9 and removed["head-split"] == []
    run = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
           for m in (str(exports[size]), model.SerializeToString())]
    np.testing.assert_allclose(run[1], run[0], rtol=0, atol=1e-5)
