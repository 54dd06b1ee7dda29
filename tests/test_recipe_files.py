"""One recipe file per configuration for every model size: the size comes from MODEL= / --model / a grid's `model:`,
a recipe that names its model refuses another in one line, and the committed records are still the records of these
files (their keys recompute from them, so moving the files re-ran nothing and returns no other number)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_tool

from tools.core.errors import UserError
from tools.core.files import digest
from tools.core.grid import expand, load_grid
from tools.core.recipe import from_dict, load
from tools.core.record import read_records
from tools.trtexec_py import AVG_TIMING


def one_size_recipe(tmp_path, model="yolo11m"):
    path = tmp_path / "fp16-m.yaml"
    path.write_text((REPO / "recipes/fp16.yaml").read_text().replace("name: fp16\n", f"name: fp16-m\nmodel: {model}\n"))
    return path


def test_a_recipe_takes_the_size_it_is_given(tmp_path):
    assert load(REPO / "recipes/int8-qdq.yaml", "yolo11s").onnx_path == REPO / "models/yolo11/yolo11s.onnx"
    own = one_size_recipe(tmp_path)
    assert load(own).model == load(own, "yolo11m").model == "yolo11m"


def test_a_recipe_for_one_size_refuses_another_in_one_line(tmp_path):
    own = one_size_recipe(tmp_path)
    with pytest.raises(UserError) as e:
        load(own, "yolo11n")
    assert str(e.value).startswith(f"{own}: is a recipe for yolo11m only") and "MODEL=yolo11m" in str(e.value)
    res = run_tool("tools.pipeline", "calib", str(own), "--model", "yolo11s")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "MODEL=yolo11m" in res.stderr, res.stderr


def make(*args):
    return subprocess.run(["make", "-s", "-n", f"PY={sys.executable}", *args], cwd=REPO, capture_output=True,
                          text=True)


def test_make_runs_every_recipe_file_on_the_model_it_is_given():
    out = make("cpu", "MODEL=yolo11s").stdout
    recipes = " ".join(f"recipes/{p.name}" for p in sorted((REPO / "recipes").glob("*.yaml")))
    assert f"tools.pipeline --model yolo11s cpu {recipes} " in out, out
    assert "--model yolo11n" in make("cpu").stdout
    profile = make("profile", "MODEL=yolo11m").stdout
    assert "engine,layers recipes/fp16.yaml recipes/int8-qdq.yaml" in profile
    assert "tools.profile --model yolo11m --recipes recipes/fp16.yaml recipes/int8-qdq.yaml" in profile
    for target in ("sensitivity", "ultralytics", "predict", "e2e", "engine", "inspect"):
        assert "--model yolo11m" in make(target, "MODEL=yolo11m").stdout, target
    # a sweep's grid names its size: MODEL= goes along only when given, so that another grid's size is refused
    assert "--model" not in make("sweep", "GRID=recipes/grids/yolo11m.yaml").stdout
    assert "tools.sweep recipes/grids/yolo11s.yaml --model yolo11s" in make("sweep", "MODEL=yolo11s").stdout


def test_a_grid_of_one_size_refuses_another(tmp_path):
    assert load_grid(REPO / "recipes/grids/yolo11s.yaml", REPO, "yolo11s").model == "yolo11s"
    res = run_tool("tools.sweep", "recipes/grids/yolo11m.yaml", "--model", "yolo11s", "--list")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "is a grid for yolo11m (its `model:`), not yolo11s" in res.stderr
    grid = tmp_path / "g.yaml"  # a grid that names no size takes the one given
    grid.write_text(f"base: {REPO}/recipes/int8-qdq.yaml\nreferences: [{REPO}/recipes/fp16.yaml]\n")
    assert {r.model for r in expand(load_grid(grid, REPO, "yolo11m"))} == {"yolo11m"}


def engine_key(recipe, rec) -> str:
    """What tools.pipeline.Point.engine_key hashes, from the recipe and the record's own inputs."""
    implicit = rec.get("implicit_calibration")
    return digest({"settings": recipe.engine_settings(rec["profile"]["name"]), "onnx": rec["onnx_sha256"],
                   "trt": rec["trt_version"], "gpu": rec["gpu"], "avg_timing": AVG_TIMING,
                   "implicit_calibration": Path(implicit["cache"]).name if implicit else None})


def committed_recipes():
    """(points folder, {name: recipe}) for every published sweep: its grid's points, and the recipe files."""
    for table in sorted(REPO.glob("results/**/sweep.json")):
        sweep = json.loads(table.read_text())
        grid = load_grid(REPO / sweep["grid"], REPO)
        files = {p.stem: load(p, grid.model) for p in (REPO / "recipes").glob("*.yaml")}
        yield table.parent / "points", {**files, **{r.name: r for r in expand(grid)}}


def test_committed_records_recompute_their_keys_from_the_recipe_files():
    checked = set()
    for points, recipes in committed_recipes():
        for rec in read_records(points):
            recipe = recipes[rec["name"]].replace(builder_optimization_level=rec["level"])
            if rec["profile"]["name"] not in recipe.profiles:
                continue
            assert engine_key(recipe, rec) == rec["engine_key"], (points, rec["name"])
            assert digest({"engine": rec["engine_key"], "eval": rec["eval"]["key"]}) == rec["key"]
            assert from_dict(rec["recipe"]).settings() == recipe.settings()
            checked.add((points.parent.name, str(points), rec["name"], rec["profile"]["name"]))
    # every engine of the three published runs (on each size's own model), of the two deploy experiments, of the
    # rewrites experiment (batch 32) and of the layers experiments (batch 1, batch 32)
    assert {m for m, *_ in checked} == {"yolo11n", "yolo11s", "yolo11m"} and \
        len(checked) == 18 + 4 + 4 + 2 + 8 + 8 + 4 + 4
