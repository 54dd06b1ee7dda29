"""The stage table: finished stages are skipped and a resumed run does only what is missing; every input that shapes
a result is in its key (GPU, TensorRT, level, profile, evaluation set); ONNX Runtime results follow the annotations'
content; a collapsed quantized model is an error; the setup round-trips through the flags a sweep hands its jobs."""
import argparse
import dataclasses
import json
import shutil

import pytest
from conftest import CALIB, MINI, REPO

import tools.core.setup as setup_mod
import tools.pipeline as pipeline
from tools.core.errors import UserError
from tools.core.recipe import load

FP16 = REPO / "recipes/fp16.yaml"


def setup(tmp_path, **kw):
    return setup_mod.Setup(calib_dir=CALIB, eval_dir=kw.pop("eval_dir", MINI), root=REPO, results=tmp_path,
                          trt_version=kw.pop("trt_version", "8.6.1"), **kw)


@pytest.fixture()
def fake_gpu(monkeypatch):
    """GPU stages that only write their part of the record, and a fixed GPU name."""
    calls = []
    monkeypatch.setattr(pipeline, "gpu_name", lambda: "Test GPU")

    def fake(stage):
        def run(point):
            calls.append((point.profile, stage.name))
            point.record.data[stage.record_key] = (
                [{"batch": b, "cuda_graph": g, "warmup_ms": point.setup.warmup_ms, "duration_s": point.setup.duration_s}
                 for b, g in pipeline.missing_timings(point)] if stage.name == "bench" else {"fake": stage.name})
            if stage.name == "accuracy" and point.setup.compare_images:
                point.record.data["compare"] = {"passed": True}
        return run

    gpu = {s.name: dataclasses.replace(s, run=fake(s)) for s in pipeline.STAGE_TABLE if s.gpu}
    gpu["engine"] = dataclasses.replace(gpu["engine"], done=lambda p: "build" in p.record.data)
    monkeypatch.setattr(pipeline, "STAGES", {**pipeline.STAGES, **gpu})
    return calls


def test_resume_runs_only_missing_stages_per_profile(tmp_path, fake_gpu):
    recipe, s = load(FP16), setup(tmp_path)
    pipeline.run_recipe(recipe, s, ("engine", "bench"))
    assert fake_gpu == [("b1", "engine"), ("b1", "bench"), ("b32", "engine"), ("b32", "bench")]
    pipeline.run_recipe(recipe, s, ("engine", "bench", "accuracy"))  # resumed: only accuracy is new
    assert fake_gpu[4:] == [("b1", "accuracy"), ("b32", "accuracy")]
    pipeline.run_recipe(recipe, s, pipeline.STAGE_SETS["gpu"])
    assert len(fake_gpu) == 6
    records = sorted((tmp_path / "yolo11n" / "points").glob("fp16.*.json"))
    assert [r.name.split(".")[1] for r in records] == ["b1", "b32"]
    rec = json.loads(records[0].read_text())
    assert rec["profile"] == {"name": "b1", "min": 1, "opt": 1, "max": 1, "bench": [1], "static": True}
    assert rec["level"] == 3 and rec["eval"]["count"] == 32 and rec["updated_utc"]
    # another timing protocol replaces the timings (a record's timings share one protocol)
    pipeline.run_recipe(recipe, dataclasses.replace(s, duration_s=1.0), ("bench",))
    assert fake_gpu[6:] == [("b1", "bench"), ("b32", "bench")]


def test_an_engine_at_its_keyed_path_is_timed_again_not_rebuilt(tmp_path, monkeypatch):
    """An engine carried with its build log from an earlier lease (same GPU model, TensorRT and inputs: same key) is
    not built again; the record says so and takes the build time from that build's log. Without its log: one line."""
    monkeypatch.setattr(pipeline, "gpu_name", lambda: f"Test GPU {tmp_path.name}")  # a key no other test shares
    builds = []
    monkeypatch.setattr(pipeline, "build", lambda *a: builds.append(a))
    b1 = setup(tmp_path, profiles=("b1",))
    point = pipeline.Point(load(FP16), b1, "b1")
    log = point.layout.logs / f"{point.engine_stem}.build.log"
    h200 = REPO / "results/yolo11n/experiments/layers-b1-L3-h200-2026-12-04/logs/fp16.b1.59c6e39a74fa.build.log"
    try:
        point.engine_path.parent.mkdir(parents=True, exist_ok=True)
        point.engine_path.write_bytes(b"plan" * 1000)
        with pytest.raises(UserError, match="engine without its build log .*bring the log along with it"):
            pipeline.run_recipe(load(FP16), b1, ("engine",))
        shutil.copy(h200, log)
        pipeline.run_recipe(load(FP16), b1, ("engine",))
        assert builds == []
        (rec,) = [json.loads(p.read_text()) for p in (tmp_path / "yolo11n" / "points").glob("fp16.b1.*.json")]
        assert rec["build"]["reused"] is True and rec["build"]["build_s"] == pytest.approx(567.461, abs=0.01)
        assert rec["build"]["engine_mb"] == 0.004 and rec["build"]["fallback"] is True
    finally:
        point.engine_path.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


def test_a_stage_needs_the_engine_first(tmp_path, fake_gpu):
    with pytest.raises(UserError, match="no engine yet"):
        pipeline.run_recipe(load(FP16), setup(tmp_path), ("bench",))


def test_keys_change_with_everything_that_shapes_the_result(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "gpu_name", lambda: "GPU A")
    recipe = load(FP16)

    def key(r=recipe, profile="b1", **kw):
        return pipeline.Point(r, setup(tmp_path, **kw), profile).key

    base = key()
    assert key(trt_version="10.3") != base
    assert key(profile="b32") != base
    assert key(r=recipe.replace(builder_optimization_level=1)) != base
    assert key(eval_limit=4) != base
    assert key(r=recipe.replace(name="other", description="x")) == base  # names are not inputs
    monkeypatch.setattr(pipeline, "gpu_name", lambda: "GPU B")
    assert key() != base


def test_calibration_cap_renames_what_it_changes(tmp_path):
    s = setup(tmp_path, calib_images=32)
    q = load(REPO / "recipes/int8-qdq.yaml")
    assert s.adapt(q).calib_images == 32 and s.adapt(q.replace(calib_images=16)).calib_images == 16
    assert s.adapt(load(FP16)) == load(FP16)


def test_a_run_level_rebuilds_every_recipe_at_that_level_under_its_own_key(tmp_path):
    """LEVEL= / --level: each recipe as the run builds it, so its points' keys (and names in a sweep) say the level."""
    q = load(REPO / "recipes/int8-dfl-mse.yaml").replace(calib_images=32)
    at1 = setup(tmp_path, level=1).adapt(q)
    assert q.builder_optimization_level == 3 and at1.builder_optimization_level == 1
    assert at1.replace(builder_optimization_level=3) == q and setup(tmp_path, level=3).adapt(q) == q
    own, low = pipeline.Point(q, setup(tmp_path), "b1"), pipeline.Point(at1, setup(tmp_path, level=1), "b1")
    pipeline.make_onnx(own)  # the Q/DQ model both keys hash (quantized here in a fresh checkout)
    assert own.onnx == low.onnx and own.key != low.key and own.engine_path != low.engine_path


def test_unknown_profile_is_refused(tmp_path):
    with pytest.raises(UserError, match="no profile 'b8'"):
        setup(tmp_path, profiles=("b8",)).engine_profiles(load(FP16))


def test_onnxrt_result_follows_the_annotations(tmp_path):
    """Shifting the boxes in annotations.json must change the ONNX Runtime result, not return the cached one."""
    ev = tmp_path / "eval"
    shutil.copytree(MINI, ev)
    s = setup(tmp_path, eval_dir=ev, eval_limit=4)
    point = pipeline.Point(load(FP16), s)
    first = pipeline.onnxrt_score(point, point.model_onnx)
    ann = json.loads((ev / "annotations.json").read_text())
    for a in ann["annotations"]:
        a["bbox"][0] += 60
    (ev / "annotations.json").write_text(json.dumps(ann))
    moved = pipeline.Point(load(FP16), s)
    second = pipeline.onnxrt_score(moved, moved.model_onnx)
    assert first["map50_95"] > 0.2 and second["map50_95"] < first["map50_95"] / 2
    assert len(list((tmp_path / "yolo11n" / "onnxrt").glob("fp32.*.json"))) == 2


def test_a_collapsed_quantized_model_is_an_error(tmp_path, monkeypatch):
    q = load(REPO / "recipes/int8-qdq.yaml")
    point = pipeline.Point(q, setup(tmp_path))
    monkeypatch.setattr(pipeline.Point, "onnx", REPO / "models/yolo11/yolo11n-qdq-stand-in.onnx")
    scores = {"fp32": 0.41, "q": 0.015}
    monkeypatch.setattr(pipeline, "onnxrt_score", lambda p, onnx: {
        "kind": "fp32" if onnx == p.model_onnx else "q", "images": 32,
        "map50_95": scores["fp32" if onnx == p.model_onnx else "q"]})
    with pytest.raises(UserError, match="collapsed"):
        pipeline.onnxrt_run(point)
    scores["q"] = 0.40
    pipeline.onnxrt_run(point)


def test_setup_round_trips_through_job_flags(tmp_path):
    ap = argparse.ArgumentParser()
    setup_mod.add_setup_args(ap)
    s = setup_mod.setup_from_args(ap.parse_args(["--trt", "8.6", "--cuda-graphs", "on", "--duration", "1.5",
                                                "--eval-limit", "8", "--compare-images", "0", "--level", "1",
                                                "--results",
                                                str(tmp_path), "--overwrite"]))
    assert setup_mod.setup_from_args(ap.parse_args(setup_mod.setup_to_args(s))) == s


@pytest.mark.parametrize("flags,expected", [(["--eval-limit", "0"], "must be 1 or more"),
                                            (["--duration", "-1"], "must be above 0"),
                                            (["--calib-images", "abc"], "not 'abc'"),
                                            (["--level", "6"], "levels are 0 to 5")])
def test_bad_numbers_are_refused_by_the_flag(flags, expected, capsys):
    ap = argparse.ArgumentParser()
    setup_mod.add_setup_args(ap)
    with pytest.raises(SystemExit):
        ap.parse_args(flags)
    err = capsys.readouterr().err
    assert flags[0] in err and expected in err


def test_onnx_override_must_exist(tmp_path):
    ap = argparse.ArgumentParser()
    setup_mod.add_setup_args(ap)
    with pytest.raises(UserError, match="no such ONNX model"):
        setup_mod.setup_from_args(ap.parse_args(["--onnx", str(tmp_path / "none.onnx")]))


def test_a_model_is_checked_before_any_work(tmp_path):
    """A static-batch model cannot serve a batch-32 profile, and a model that is no detector is refused, each in one
    line, before anything is quantized or built."""
    import onnx

    from tools.yolo.graph import load as load_model

    model = load_model(REPO / "models/yolo11/yolo11n.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # batch 1 only
    static = tmp_path / "static.onnx"
    onnx.save(model, str(static))
    point = pipeline.Point(load(FP16).replace(onnx=str(static)), setup(tmp_path), "b32")
    with pytest.raises(UserError, match=r"takes batch 1 only, but profile 'b1'|profile 'b32'"):
        point.model_onnx
    text = tmp_path / "text.onnx"
    text.write_text("not a model")
    with pytest.raises(UserError, match="text.onnx"):
        pipeline.Point(load(FP16).replace(onnx=str(text)), setup(tmp_path)).model_onnx


def test_no_stage_runs_on_a_model_that_is_not_a_detector(tmp_path):
    """`make quantize` with a classifier as the recipe's model stops at the model check, before calibration."""
    from onnx import TensorProto, helper

    cls = tmp_path / "cls.onnx"
    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["images"], ["out"])], "cls",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 1, 1])])
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(cls))
    recipe = load(REPO / "recipes/int8-qdq.yaml").replace(onnx=str(cls), calib_images=4)
    with pytest.raises(UserError, match="cls.onnx"):
        pipeline.run_recipe(recipe, dataclasses.replace(setup(tmp_path), root=tmp_path), ("calib", "quantize"))
    assert not (tmp_path / "calib").exists() and not (tmp_path / "models").exists()  # refused before any work


def test_a_point_names_the_quantized_model_without_making_it(tmp_path):
    """Reading Point.onnx starts no ModelOpt run: the quantize stage makes the file, and its done-check and the Point
    name the same path."""
    recipe = load(REPO / "recipes/int8-qdq.yaml").replace(calib_images=4)
    point = pipeline.Point(recipe, setup_mod.Setup(calib_dir=CALIB, eval_dir=MINI, root=tmp_path, results=tmp_path,
                                                   trt_version="8.6.1"), "b1")
    assert point.onnx.parent == tmp_path / "models/yolo11n/quant" and point.onnx.name.startswith("int8-qdq.")
    assert not point.onnx.exists() and not pipeline.quantize_done(point)
    assert not (tmp_path / "models").exists() and not (tmp_path / "logs").exists()  # nothing was started
    assert pipeline.onnxrt_results(point) == []  # a summary of a run that never quantized reads the FP32 score only
