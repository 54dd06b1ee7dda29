"""The default grid's references get a `polygraphy run` comparison against ONNX Runtime (bench key
`compare_references`: images), the points none; the comparison is in no key, so a committed reference keeps its record
and its key, and a rerun of the sweep only adds the comparison to it (no rebuild, no retiming, no new mAP)."""
import argparse
import dataclasses
import json
import shutil
import subprocess

from conftest import CALIB, MINI, REPO

import tools.pipeline as pipeline
import tools.sweep as sweep
from tools.core.grid import expand, load_grid
from tools.core.recipe import load
from tools.core.setup import Setup, add_setup_args, setup_from_args
from tools.sweep import Runner, grid_setup, job_setup

COMMITTED = REPO / "results/yolo11n/points/fp16.b1.effb10a0c73e.json"  # the default grid's FP16 reference, batch 1


def job_flags(tmp_path, monkeypatch, grid, recipe):
    """The pipeline flags a sweep job of `recipe` runs with (Runner.launch, its process replaced)."""
    ran = []
    monkeypatch.setattr(sweep.subprocess, "run",
                        lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    setup = grid_setup(grid, Setup(calib_dir=CALIB, eval_dir=MINI, results=tmp_path, trt_version="8.6.1"))
    runner = Runner(grid, setup, ["0"], 1, lambda records: None)
    runner.launch(runner.chain(recipe, "b1", ("accuracy",))[0], "0", recipe, "b1")
    ap = argparse.ArgumentParser()
    ap.add_argument("stage")
    ap.add_argument("recipe")
    ap.add_argument("--model")
    add_setup_args(ap)
    return ap.parse_args(ran[0][3:])


def test_references_are_compared_and_points_are_not(tmp_path, monkeypatch):
    grid = load_grid(REPO / "recipes/grids/yolo11n.yaml", REPO)
    assert grid.bench.compare_images == 0 and grid.bench.compare_references == 4
    points = {p.name: p for p in expand(grid)}
    assert job_flags(tmp_path, monkeypatch, grid, points["fp16"]).compare_images == 4
    assert job_flags(tmp_path, monkeypatch, grid, points["qdq-entropy-x-dfl"]).compare_images == 0
    wide = load_grid(REPO / "recipes/grids/yolo11n-wide.yaml", REPO)  # no compare_references: as every point
    assert job_setup(wide, grid_setup(wide, Setup(calib_dir=CALIB, eval_dir=MINI)), points["fp16"]) \
        .compare_images == 0


def test_a_committed_reference_keeps_its_key_and_gains_only_the_comparison(tmp_path, monkeypatch):
    grid = load_grid(REPO / "recipes/grids/yolo11n.yaml", REPO)
    fp16 = expand(grid)[0]
    args = job_flags(tmp_path, monkeypatch, grid, fp16)
    setup = dataclasses.replace(setup_from_args(args), root=tmp_path)
    monkeypatch.setattr(pipeline, "gpu_name", lambda: "NVIDIA H200")  # the GPU the committed record was built on
    point = pipeline.Point(load(args.recipe), setup, "b1")
    committed = json.loads(COMMITTED.read_text())
    assert point.engine_key == committed["engine_key"]  # the comparison count is in no key
    # the committed record and its engine where this run looks for them (its key: the engine's and the images')
    record = point.layout.points / f"fp16.b1.{point.key}.json"
    record.parent.mkdir(parents=True)
    shutil.copyfile(COMMITTED, record)
    point.engine_path.parent.mkdir(parents=True)
    point.engine_path.write_bytes(b"plan")
    compared = []
    monkeypatch.setattr(pipeline, "compare", lambda engine, onnx, images, work, count, **kw: compared.append(
        (engine, onnx, count)) or {"images": count, "passed": True, "min_required_atol": 0.1})
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("mAP")))
    [rec] = pipeline.run_recipe(load(args.recipe), setup, ("engine", "bench", "accuracy"), log=lambda line: None)
    assert compared == [(point.engine_path, REPO / "models/yolo11/yolo11n.onnx", 4)]
    assert rec["compare"] == {"images": 4, "passed": True, "min_required_atol": 0.1}
    unchanged = ("engine_key", "build", "bench", "accuracy")
    assert {k: rec[k] for k in unchanged} == {k: committed[k] for k in unchanged}
    assert list(record.parent.iterdir()) == [record] and json.loads(record.read_text())["compare"]["images"] == 4
    # under the points' setup (no comparison) the committed record was finished as it was
    shutil.copyfile(COMMITTED, record)
    assert pipeline.accuracy_done(pipeline.Point(point.recipe, dataclasses.replace(setup, compare_images=0), "b1"))
    assert not pipeline.accuracy_done(pipeline.Point(point.recipe, setup, "b1"))
