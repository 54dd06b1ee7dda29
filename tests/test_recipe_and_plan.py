"""Recipes load, reject bad input, hash what matters; trt_plan maps each precision onto TensorRT 8.6/10/11."""
import pytest
from conftest import REPO

from tools.core.errors import UserError
from tools.core.files import digest
from tools.core.recipe import from_dict, load
from tools.trt_plan import plan

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_shipped_recipes_load():
    names = {load(p).name for p in RECIPES}
    assert {"fp16", "int8-qdq", "int8-implicit", "int8-ultralytics"} <= names


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nprecision: fp16\ncalibraton_method: max\n")
    with pytest.raises(UserError, match="calibraton_method"):
        load(bad)


@pytest.mark.parametrize("field,value,expected", [
    ("precision", "int4", "precision"), ("calibration_method", "kl", "calibration_method"),
    ("builder_optimization_level", 9, "less than or equal to 5"), ("builder_optimization_level", "0", "integer"),
    ("calib_images", "abc", "calib_images"), ("calib_images", 3.5, "integer"), ("calib_images", 0, "greater than"),
    ("nodes_to_exclude", "attn", "list"), ("nodes_to_exclude", ["("], "not a regular expression"),
    ("timing_cache", "yes", "boolean"), ("profiles", {}, "at least 1"), ("profiles", {"b1": {"batch": 1, "bench": [8]}},
                                                                        "built for"),
    ("profiles", {"x": {"min": 8, "opt": 4, "max": 32}}, "min <= opt <= max"), ("imgsz", 650, "multiple of 32"),
    ("name", "a b", "pattern")])
def test_bad_values_are_one_line_errors_naming_the_key(field, value, expected):
    with pytest.raises(UserError) as e:
        from_dict({"name": "x", field: value}, "r.yaml")
    text = str(e.value)
    assert text.startswith("r.yaml: ") and field in text and expected in text and "\n" not in text


def test_yaml_errors_name_the_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nprecision: [fp16\n")
    with pytest.raises(UserError, match=r"r.yaml: not valid YAML at line \d"):
        load(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load(bad)


def test_profiles_static_and_dynamic():
    r = from_dict({"name": "x", "profiles": {"lat": {"batch": 1}, "dyn": {"min": 1, "opt": 8, "max": 32}}})
    assert r.profiles["lat"].static and r.profiles["lat"].bench == (1,)
    assert not r.profiles["dyn"].static and r.profiles["dyn"].bench == (1, 8, 32)
    assert r.engine_settings("lat")["profile"] != r.engine_settings("dyn")["profile"]


def test_stage_settings_are_derived_from_the_fields():
    """Each stage's key holds the fields that shape it (and earlier stages'), for the recipe's precision only."""
    q = load(REPO / "recipes/int8-qdq.yaml")
    assert set(q.settings("calib")) == {"imgsz", "calib_images", "calib_seed"}
    assert {"calibration_method", "nodes_to_exclude", "high_precision_dtype"} <= set(q.settings("quantize"))
    assert "builder_optimization_level" not in q.settings("quantize")
    f = load(REPO / "recipes/fp16.yaml")
    assert "calib_images" not in f.settings() and "calibration_method" not in f.settings()
    assert digest(f.settings()) == digest(f.replace(calib_images=7, calibration_method="max").settings())
    # every field either shapes a stage or is declared identity: a new key cannot be left out of the keys silently
    from tools.core.recipe import Recipe
    identity = {"name", "model", "description", "onnx", "notes", "profiles"}
    assert {n for n, fld in Recipe.model_fields.items() if not fld.json_schema_extra} == identity


def test_key_follows_settings_not_name():
    r = load(REPO / "recipes/int8-qdq.yaml")
    assert digest(r.settings()) == digest(r.replace(name="other").settings())
    assert digest(r.settings()) != digest(r.replace(calib_images=64).settings())
    assert digest(r.settings()) != digest(r.replace(nodes_to_exclude=()).settings())


def test_plan_fp16():
    r = load(REPO / "recipes/fp16.yaml")
    assert plan(r, "8.6.1").precision_flags == ("--fp16",)
    assert plan(r, "10.13").precision_flags == ("--fp16",)
    p11 = plan(r, "11.4")
    assert p11.precision_flags == ("--stronglyTyped",) and p11.onnx_kind == "autocast-fp16"


def test_plan_qdq_high_precision_dtype_per_version():
    r = load(REPO / "recipes/int8-ultralytics.yaml")  # asks for fp16 high precision
    assert plan(r, "8.6").high_precision_dtype == "fp32"  # 8.6 misreads FP16 scales
    assert plan(r, "10.8").high_precision_dtype == "fp16"
    assert plan(r, "10.8").precision_flags == ("--fp16", "--int8")
    p11 = plan(r.replace(high_precision_dtype="fp32"), "11")
    assert p11.high_precision_dtype == "fp16" and p11.precision_flags == ("--stronglyTyped",)


def test_plan_implicit_int8_stops_at_trt11():
    r = load(REPO / "recipes/int8-implicit.yaml")
    assert plan(r, "10.3").implicit_calibration
    with pytest.raises(UserError, match="TensorRT <= 10"):
        plan(r, "11.0")


def test_dump_round_trips_and_leaves_omitted_defaults_out(tmp_path):
    """A dumped recipe (the report's chosen.yaml) loads back to the same recipe; `qdq_rewrites` appears only when set,
    as in the recipe files, so a default recipe's YAML does not change when such a field is added."""
    import yaml

    from tools.core.recipe import dump
    base = load(REPO / "recipes/int8-qdq.yaml")
    for recipe in (base, base.replace(qdq_rewrites=("concat",))):
        path = tmp_path / "r.yaml"
        path.write_text(dump(recipe))
        assert load(path) == recipe
        assert ("qdq_rewrites" in yaml.safe_load(path.read_text())) == bool(recipe.qdq_rewrites)
