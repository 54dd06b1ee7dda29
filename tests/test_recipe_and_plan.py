"""Recipes load, reject bad input, hash what matters; trt_plan maps each precision onto TensorRT 8.6/10/11."""
import pytest
from conftest import REPO

from tools.common import UserError
from tools.recipe import digest, from_dict, load
from tools.trt_plan import plan

RECIPES = sorted((REPO / "recipes" / "yolo11n").glob("*.yaml"))


def test_shipped_recipes_load():
    names = {load(p).name for p in RECIPES}
    assert {"fp16", "int8-qdq", "int8-implicit", "int8-ultralytics"} <= names


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nprecision: fp16\ncalibraton_method: max\n")
    with pytest.raises(UserError, match="calibraton_method"):
        load(bad)


@pytest.mark.parametrize("field,value", [("precision", "int4"), ("calibration_method", "kl"),
                                         ("builder_optimization_level", 9), ("bench_batches", [64])])
def test_bad_values_are_refused(field, value):
    with pytest.raises(UserError):
        from_dict({"name": "x", field: value})


def test_key_follows_settings_not_name():
    r = load(REPO / "recipes/yolo11n/int8-qdq.yaml")
    assert digest(r.settings()) == digest(r.replace(name="other").settings())
    assert digest(r.settings()) != digest(r.replace(calib_images=64).settings())
    assert digest(r.settings()) != digest(r.replace(nodes_to_exclude=()).settings())


def test_plan_fp16():
    r = load(REPO / "recipes/yolo11n/fp16.yaml")
    assert plan(r, "8.6.1").precision_flags == ("--fp16",)
    assert plan(r, "10.13").precision_flags == ("--fp16",)
    p11 = plan(r, "11.4")
    assert p11.precision_flags == ("--stronglyTyped",) and p11.onnx_kind == "autocast-fp16"


def test_plan_qdq_high_precision_dtype_per_version():
    r = load(REPO / "recipes/yolo11n/int8-ultralytics.yaml")  # asks for fp16 high precision
    assert plan(r, "8.6").high_precision_dtype == "fp32"  # 8.6 misreads FP16 scales
    assert plan(r, "10.8").high_precision_dtype == "fp16"
    assert plan(r, "10.8").precision_flags == ("--fp16", "--int8")
    p11 = plan(r.replace(high_precision_dtype="fp32"), "11")
    assert p11.high_precision_dtype == "fp16" and p11.precision_flags == ("--stronglyTyped",)


def test_plan_implicit_int8_stops_at_trt11():
    r = load(REPO / "recipes/yolo11n/int8-implicit.yaml")
    assert plan(r, "10.3").implicit_calibration
    with pytest.raises(UserError, match="TensorRT <= 10"):
        plan(r, "11.0")
