"""`make inspect`: Polygraphy's layer view of a recipe's built engines where Polygraphy can read them (TensorRT 8.6.1
or later), else one line saying why and the ONNX the engines are built from instead. TensorRT is faked by a stub
module of a given version and Polygraphy by a script that prints the command it got: the CPU cannot run an engine,
but it can check what would be run on which file, and the real Polygraphy runs on the ONNX."""
import json
import sys

import pytest
from conftest import REPO, run_tool

from tools.core.recipe import load, to_dict
from tools.core.setup import Setup

FAKE = "import json, sys; print('FAKE ' + json.dumps(sys.argv[1:]))"


@pytest.fixture()
def polygraphy(tmp_path):
    script = tmp_path / "polygraphy.py"
    script.write_text(FAKE + "\n")
    return f"{sys.executable} {script}"


def with_tensorrt(tmp_path, version):
    stub = tmp_path / f"trt-{version}"
    (stub / "tensorrt").mkdir(parents=True)
    (stub / "tensorrt" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    return {"PYTHONPATH": f"{REPO}:{stub}"}


def built(tmp_path, recipe="fp16", profile="b1"):
    """A record of the recipe's engine as the pipeline writes it (the parts inspect reads) and the engine file."""
    r = Setup(calib_dir=REPO / "calib/images", eval_dir=REPO / "data/coco-mini", calib_images=32).adapt(
        load(REPO / f"recipes/{recipe}.yaml"))
    engine = tmp_path / "engines" / f"{recipe}.{profile}.k.engine"
    engine.parent.mkdir(parents=True, exist_ok=True)
    engine.write_bytes(b"plan")
    rec = {"name": r.name, "key": "k", "profile": {"name": profile}, "level": r.builder_optimization_level,
           "recipe": to_dict(r), "build": {"engine": str(engine)}, "updated_utc": "2026-12-01T00:00:00Z"}
    points = tmp_path / "runs" / "yolo11n" / "points"
    points.mkdir(parents=True, exist_ok=True)
    (points / f"{recipe}.{profile}.k.json").write_text(json.dumps(rec))
    return engine


def inspect(tmp_path, polygraphy, recipe="fp16", *extra, **env):
    return run_tool("tools.polygraphy_inspect", f"recipes/{recipe}.yaml", "--results", str(tmp_path / "runs"),
                    "--profiles", "b1", "--calib-images", "32", "--polygraphy", polygraphy, *extra, **env)


def commands(stdout):
    return [json.loads(line.removeprefix("FAKE ")) for line in stdout.splitlines() if line.startswith("FAKE ")]


def test_a_built_engine_is_inspected_by_polygraphy(tmp_path, polygraphy):
    engine = built(tmp_path)
    res = inspect(tmp_path, polygraphy, **with_tensorrt(tmp_path, "8.6.1"))
    assert res.returncode == 0, res.stderr
    assert commands(res.stdout) == [["inspect", "model", str(engine), "--model-type", "engine", "--show", "layers"]]
    log = REPO / "logs/yolo11n/inspect" / f"{engine.name}.txt"
    assert log.read_text().startswith("# ") and "--model-type engine" in log.read_text().splitlines()[0]


@pytest.mark.parametrize("version,why", [
    (None, "TensorRT is not installed here"),
    ("8.5.3.1", "TensorRT 8.5.3.1 is older than 8.6.1, which Polygraphy's engine view needs")])
def test_an_engine_polygraphy_cannot_read_here_is_one_line_and_the_onnx_is_inspected(tmp_path, polygraphy,
                                                                                     version, why):
    engine = built(tmp_path)
    res = inspect(tmp_path, polygraphy, **(with_tensorrt(tmp_path, version) if version else {}))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"fp16 [b1]: engine {engine} not inspected: {why}")
    assert commands(res.stdout) == [["inspect", "model", str(REPO / "models/yolo11/yolo11n.onnx"), "--model-type",
                                     "onnx", "--show", "layers"]]


def test_an_engine_inspector_json_polygraphy_cannot_parse_is_one_line_and_the_onnx_is_inspected(tmp_path):
    """What Polygraphy 0.53.6 printed on the H200 for an engine of TensorRT 8.6.1 (its last line, exit 1)."""
    script = tmp_path / "polygraphy.py"
    script.write_text("import sys\n"
                      "if 'engine' in sys.argv:\n"
                      "    print('json.decoder.JSONDecodeError: Invalid control character at: line 42 column 48')\n"
                      "    sys.exit(1)\n" + FAKE + "\n")
    engine = built(tmp_path)
    res = inspect(tmp_path, f"{sys.executable} {script}", **with_tensorrt(tmp_path, "8.6.1"))
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    assert first.startswith(f"fp16 [b1]: engine {engine} not inspected: Polygraphy cannot parse its engine "
                            f"inspector JSON (raw control characters, as TensorRT 8.6 writes them")
    assert first.endswith("`make profile RECIPE=recipes/fp16.yaml MODEL=yolo11n` lists its layers and their precisions")
    assert commands(res.stdout) == [["inspect", "model", str(REPO / "models/yolo11/yolo11n.onnx"), "--model-type",
                                     "onnx", "--show", "layers"]]
    assert "Invalid control character" in (REPO / "logs/yolo11n/inspect" / f"{engine.name}.txt").read_text()


def test_no_engine_yet_names_the_target_that_builds_it_and_the_real_polygraphy_shows_the_onnx(tmp_path):
    res = inspect(tmp_path, f"{sys.executable} -m tools.polygraphy_cli")
    assert res.returncode == 0, res.stderr
    first = res.stdout.splitlines()[0]
    assert first == ("fp16 [b1]: no engine yet; `make engine RECIPE=recipes/fp16.yaml MODEL=yolo11n` builds it on a "
                     "GPU machine")
    assert "/model.0/conv/Conv [Op: Conv]" in res.stdout and "/model.23/dfl/conv/Conv [Op: Conv]" in res.stdout


def test_without_an_engine_or_a_quantized_model_it_says_which_target_makes_one(tmp_path, polygraphy):
    recipe = tmp_path / "q.yaml"  # a calibration seed no run used: its Q/DQ model cannot exist
    recipe.write_text((REPO / "recipes/int8-qdq.yaml").read_text().replace("calib_seed: 0", "calib_seed: 4242"))
    assert load(recipe).calib_seed == 4242
    res = run_tool("tools.polygraphy_inspect", str(recipe), "--results", str(tmp_path / "runs"), "--calib-images",
                   "32", "--polygraphy", polygraphy)
    assert res.returncode == 2 and not commands(res.stdout)
    assert res.stderr.count("\n") == 1 and "no ONNX of recipe 'int8-qdq' to inspect instead either" in res.stderr
    assert f"`make quantize RECIPE={recipe} MODEL=yolo11n` makes it" in res.stderr


def test_an_engine_built_with_other_settings_is_not_this_recipes(tmp_path, polygraphy):
    built(tmp_path)
    res = inspect(tmp_path, polygraphy, "fp16", "--level", "1", **with_tensorrt(tmp_path, "10.3.0"))
    assert res.returncode == 0 and res.stdout.startswith("fp16 [b1]: no engine yet")
    assert [c[4] for c in commands(res.stdout)] == ["onnx"]
