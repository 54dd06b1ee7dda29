"""No number without its inputs: a summary shows the scores of the recipes as they ran (not the newest of a name),
every cached score is keyed by what shapes it (image size, evaluation content), the calibration/evaluation overlap
is checked on every run, `make clean` removes only what runs wrote, every recipe key is sweepable or refused by
name, and bad numbers, duplicated keys, a full disk or a sweep table without its records are one line each."""
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import CALIB, MINI, MODEL, REPO, run_tool, tool_env

import tools.core.setup as setup_mod
import tools.pipeline as pipeline
from tools.calib import select_images
from tools.core.cli import positive_number
from tools.core.errors import UserError
from tools.core.files import list_images
from tools.core.grid import UNSWEPT, expand, load_grid
from tools.core.layout import Layout
from tools.core.recipe import FIELDS, NAME, load, to_dict
from tools.quantize import quantized_path, unmatched_exclusions
from tools.records import clean
from tools.summary import ran_results, summarize

INT8 = REPO / "recipes/int8-qdq.yaml"
FP16 = REPO / "recipes/fp16.yaml"


def one_line_error(res, *words):
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert all(w in lines[0] for w in words), lines[0]


def small_setup(tmp_path, **kw):
    return setup_mod.Setup(calib_dir=CALIB, eval_dir=MINI, root=tmp_path, results=tmp_path / "runs", calib_images=4,
                          trt_version="10", **kw)


# ----------------------------------------------------------------------------------------------------------------
# 1. The summary of a run: its recipes as they ran, one name each
def test_summary_shows_the_reverted_recipes_score_not_the_edited_ones(tmp_path):
    """Edit int8-qdq (mse), run, revert, run: both scores are cached, the edited one newer; the summary of the
    reverted run shows the reverted recipe's score, and no recipe outside the run."""
    setup = small_setup(tmp_path)
    reverted = setup.adapt(load(INT8))
    edited = reverted.replace(calibration_method="mse")
    layout = setup.layout("yolo11n")
    for recipe, score, when in ((reverted, 0.4033, "2026-12-01T00:00:00Z"), (edited, 0.4026, "2026-12-02T00:00:00Z")):
        point = pipeline.Point(recipe, setup)
        qdq = quantized_path(recipe, point.plan.high_precision_dtype, setup.root, point.calib_npy.stem)
        qdq.parent.mkdir(parents=True, exist_ok=True)
        qdq.write_bytes(f"the Q/DQ model of {recipe.calibration_method}".encode())  # what ModelOpt made: its bytes key
        for onnx, kind, value in ((qdq, recipe.name, score), (point.model_onnx, "fp32", 0.4078)):
            layout.write_json(pipeline.onnxrt_path(point, onnx), {"kind": kind, "map50_95": value, "map50": 0.5,
                                                                  "images": 32, "eval": point.eval,
                                                                  "updated_utc": when})
    layout.write_json(layout.onnxrt / "int8-dfl-mse.abc.json", {"kind": "int8-dfl-mse", "map50_95": 0.4, "map50": 0.5,
                                                               "images": 32, "eval": pipeline.Point(reverted, setup)
                                                               .eval, "updated_utc": "2026-12-03T00:00:00Z"})
    for recipe, score, when in ((reverted, 0.3701, "2026-12-01T00:00:00Z"), (edited, 0.3694, "2026-12-02T00:00:00Z")):
        rec = {"name": recipe.name, "key": recipe.calibration_method, "gpu": "G", "trt_version": "10", "level": 3,
               "profile": {"name": "b1", "min": 1, "opt": 1, "max": 1}, "recipe": to_dict(recipe),
               "bench": [{"batch": 1, "cuda_graph": True, "latency_ms_p50": 0.8, "latency_ms_p99": 0.9,
                          "throughput_ips": 1250.0}], "accuracy": {"map50_95": score, "map50": 0.5},
               "build": {"engine_mb": 4.0, "build_s": 60.0}, "eval": {"key": pipeline.Point(recipe, setup).eval["key"]},
               "updated_utc": when}
        layout.write_json(layout.points / f"int8-qdq.b1.{rec['key']}.json", rec)
    s = summarize(layout, ["int8-qdq"], MINI, None, False, ran_results([reverted], setup))
    assert s["onnxrt"]["int8-qdq"]["map50_95"] == 0.4033
    assert set(s["onnxrt"]) == {"int8-qdq", "fp32"}  # int8-dfl-mse was not part of this run
    assert [e["map50_95"] for e in s["engines"]] == [0.3701]


def test_two_recipes_of_one_name_in_a_run_refused(tmp_path):
    for n in (1, 2):
        (tmp_path / f"r{n}.yaml").write_text(FP16.read_text())
    with pytest.raises(UserError, match="also the name of"):
        pipeline.main(["onnxrt", str(tmp_path / "r1.yaml"), str(tmp_path / "r2.yaml"), "--eval-limit", "1",
                       "--results", str(tmp_path / "runs")])


# ----------------------------------------------------------------------------------------------------------------
# 2. make clean
def test_make_clean_removes_only_what_runs_wrote_for_the_model(tmp_path):
    out = tmp_path / "zz-clean"
    written = [out / "points/a.b1.k.json", out / "onnxrt/fp32.k.json", out / "summary.md"]
    kept = [out / "my-notes.txt", out / "points/README", tmp_path / "yolo11n/points/x.json"]
    for path in written + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    res = subprocess.run(["make", "-s", "clean", "MODEL=zz-clean", f"RESULTS={tmp_path}", f"PY={sys.executable}"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not any(p.exists() for p in written) and all(p.exists() for p in kept)
    assert not (out / "onnxrt").exists()  # the folder it emptied goes too


def test_clean_keeps_committed_and_foreign_files_in_build_folders(tmp_path):
    layout = Layout("yolo11n", tmp_path, tmp_path / "runs")
    made = [layout.engines / "fp16.b1.k.engine", layout.logs / "sweep/x.engine.log", layout.calib / "640-n4-s0-d.npy",
            layout.quant / "int8-qdq.k.onnx", layout.deploy_onnx("int8-qdq.k.onnx", "d"), layout.e2e("json"),
            layout.predict("fp16") / "bus.jpg", layout.predict("fp16") / "detections.json"]
    mine = [layout.engines / "notes.txt", layout.calib / "my.jpg"]
    for path in made + mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(clean(layout)) == sorted(made)
    assert all(p.exists() for p in mine) and not layout.logs.exists() and not layout.quant.parent.exists()
    assert not layout.out.exists()  # e2e tables and predictions were the run's: the results folder goes too


# ----------------------------------------------------------------------------------------------------------------
# 3. The calibration/evaluation overlap check runs whenever a calibrated recipe runs
def test_overlap_refused_with_the_calibration_tensor_already_there(tmp_path):
    setup = small_setup(tmp_path)
    recipe = load(INT8)
    pipeline.run_recipe(recipe, setup, ("calib",))  # the tensor, checked against the shipped evaluation images
    chosen = select_images(list_images(CALIB), 4, recipe.calib_seed)
    fake = tmp_path / "eval"
    (fake / "images").mkdir(parents=True)
    for p in chosen:
        shutil.copy(p, fake / "images")
    shutil.copy(MINI / "annotations.json", fake)
    with pytest.raises(UserError, match="same image as evaluation image"):
        pipeline.run_recipe(recipe, replace(setup, eval_dir=fake), ("calib", "quantize", "onnxrt"))


# ----------------------------------------------------------------------------------------------------------------
# 4. An evaluation set without annotations has no mAP (COCO's -1 is no score)
def test_images_without_annotations_are_no_score(tmp_path):
    from tools.evaluate import evaluate

    first = sorted((MINI / "images").iterdir())[0]
    data = json.loads((MINI / "annotations.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != int(first.stem)]
    (tmp_path / "images").mkdir()
    shutil.copy(first, tmp_path / "images")
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="none of the 1 images scored has an annotation"):
        evaluate(MODEL, tmp_path, batch=1)


# ----------------------------------------------------------------------------------------------------------------
# 5. The ONNX Runtime score is keyed by (and measured at) the recipe's image size
def test_onnxrt_score_at_the_recipes_image_size(tmp_path):
    from tools.evaluate import evaluate

    setup = replace(small_setup(tmp_path), eval_limit=2)
    p640 = pipeline.Point(load(FP16), setup)
    p320 = pipeline.Point(load(FP16).replace(imgsz=320), setup)
    assert pipeline.onnxrt_path(p640, p640.model_onnx) != pipeline.onnxrt_path(p320, p320.model_onnx)
    assert pipeline.onnxrt_path(p640, p640.model_onnx).name.startswith("fp32.")
    res = pipeline.onnxrt_score(p320, p320.model_onnx)
    assert res["map50_95"] == evaluate(MODEL, MINI, batch=8, imgsz=320, limit=2)["map50_95"]
    assert res["map50_95"] != evaluate(MODEL, MINI, batch=8, imgsz=640, limit=2)["map50_95"]


# ----------------------------------------------------------------------------------------------------------------
# 6. A duplicated key is an error, not the last value
def test_duplicated_recipe_key_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: int8-qdq\nprecision: int8-qdq\ncalib_images: 32\nprecision: fp16\n")
    with pytest.raises(UserError, match=r"line 4 .*'precision' appears twice"):
        load(path)


# ----------------------------------------------------------------------------------------------------------------
# 7. Every recipe key is sweepable or refused by name
SWEEP = {  # key: (base recipe, a value off the base's, other axes of a product grid)
    "imgsz": (INT8, 320, {}), "precision": (INT8, "fp16", {}), "calib_images": (INT8, 16, {}),
    "calib_seed": (INT8, 1, {}), "calibration_method": (INT8, "max", {}),
    "calibration_percentile": (INT8, 99.9, {"calibration_method": ["percentile"]}),
    "nodes_to_exclude": (INT8, ["/model\\.10/.*"], {}), "op_types_to_exclude": (INT8, ["Sigmoid"], {}),
    "high_precision_dtype": (INT8, "fp16", {}), "qdq_rewrites": (INT8, ["concat"], {}),
    "calibration_eps": (INT8, ["cpu", "trt"], {}),
    "implicit_calibrator": (REPO / "recipes/int8-implicit.yaml", "entropy", {}),
    "layer_precisions": (INT8, [{"match": "/model\\.0/", "precision": "fp32"}], {}),
    "builder_optimization_level": (INT8, 1, {}), "timing_cache": (INT8, False, {}),
    "deploy": (INT8, {"input": "uint8-nhwc", "nms": {"conf": 0.001, "iou": 0.7, "max_det": 300}}, {}),
    "graph_rewrites": (INT8, ["split-conv"], {}), "input_io_format": (INT8, "fp16:chw", {}),
    "output_io_format": (FP16, "fp16:chw", {})}


def grid(tmp_path, base, axes, design="one-at-a-time"):
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps({"base": str(base.relative_to(REPO)), "design": design, "axes": axes}))
    return path


def test_the_sweep_table_covers_every_recipe_key():
    assert set(SWEEP) | set(UNSWEPT) == set(FIELDS)


@pytest.mark.parametrize("key", sorted(SWEEP))
def test_every_sweepable_key_makes_a_named_point(tmp_path, key):
    base, value, more = SWEEP[key]
    points = expand(load_grid(grid(tmp_path, base, {key: [value], **more}, "product" if more else "one-at-a-time")))
    assert all(re.fullmatch(NAME, p.name) for p in points)
    changed = [p for p in points if getattr(p, key) != getattr(load(base), key)]
    assert len(changed) == 1, [p.name for p in points]


@pytest.mark.parametrize("key", sorted(UNSWEPT))
def test_unsweepable_keys_refused_by_name(tmp_path, key):
    with pytest.raises(UserError, match=f"axis '{key}' cannot be swept"):
        load_grid(grid(tmp_path, INT8, {key: ["x"]}))


def test_product_grid_with_an_empty_axis_refused(tmp_path):
    with pytest.raises(UserError, match="axis 'calib_images' has no values"):
        load_grid(grid(tmp_path, INT8, {"calibration_method": ["max", "mse"], "calib_images": []}, "product"))


def test_axis_that_shapes_nothing_for_the_base_refused(tmp_path):
    with pytest.raises(UserError, match="axis 'calibration_method' shapes only int8-qdq recipes"):
        load_grid(grid(tmp_path, FP16, {"calibration_method": ["entropy", "mse"]}))
    with pytest.raises(UserError, match="axis 'calibration_percentile' shapes only recipes with calibration_method"):
        load_grid(grid(tmp_path, INT8, {"calibration_percentile": [99.9, 99.99]}))


# ----------------------------------------------------------------------------------------------------------------
# 8. Numbers, a full disk, a sweep table without its records
@pytest.mark.parametrize("args,flag", [(("tools.report", "--budget", "nan"), "--budget"),
                                       (("tools.report", "--budget", "inf"), "--budget"),
                                       (("tools.sweep", "recipes/grids/yolo11n.yaml", "--stop-after", "nan"),
                                        "--stop-after")])
def test_numbers_that_are_no_numbers_refused(args, flag):
    res = run_tool(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"argument {flag}" in res.stderr.strip().splitlines()[-1], res.stderr
    with pytest.raises(Exception, match="finite"):
        positive_number("inf")


def _small_files():
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # a disk that takes 100 kB per file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past it fails with EFBIG, as on a full disk


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "calib.npy"
    res = subprocess.run([sys.executable, "-m", "tools.calib", str(CALIB), "-o", str(out), "-n", "2"], cwd=REPO,
                         capture_output=True, text=True, env=tool_env(), preexec_fn=_small_files)
    one_line_error(res, str(out), "cannot be written")
    assert list(tmp_path.iterdir()) == []


def test_sweep_table_without_its_records_is_one_line(tmp_path):
    (tmp_path / "yolo11n").mkdir()
    shutil.copy(REPO / "results/yolo11n/sweep.json", tmp_path / "yolo11n")
    res = run_tool("tools.report", "--results", str(tmp_path))
    one_line_error(res, "sweep.json", "points")
    assert sorted(p.name for p in (tmp_path / "yolo11n").iterdir()) == ["sweep.json"]  # nothing half-written


def test_an_exclusion_that_matches_no_node_is_a_warning_naming_the_nearest():
    assert unmatched_exclusions(MODEL, ["/model\\.10/.*", "/model.23/cv3"]) == []
    [warning] = unmatched_exclusions(MODEL, ["/model\\.99/conv"])
    assert "matches no node" in warning and "nearest: /model." in warning


def test_a_labelled_axis_of_mappings_names_its_points(tmp_path):
    e2e = {"input": "uint8-nhwc", "nms": {"conf": 0.001, "iou": 0.7, "max_det": 300}}
    points = expand(load_grid(grid(tmp_path, INT8, {"deploy": {"e2e": e2e, "fold": {"input": "uint8-nchw"}}})))
    named = {p.name: p.deploy for p in points}
    assert named["qdq-deploy-e2e"].nms.max_det == 300 and named["qdq-deploy-fold"].nms is None
    with pytest.raises(UserError, match=r"axis 'nodes_to_exclude' value 'x': give a value or \{from: proposal.json\}"):
        load_grid(grid(tmp_path, INT8, {"nodes_to_exclude": {"x": {"from": "a.json", "more": 1}}}))

