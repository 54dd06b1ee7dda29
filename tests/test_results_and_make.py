"""The summary shows what this run measured on this evaluation set (and says where the published GPU table is when it
measured none); the Makefile lists and honours every knob; tools/devkit_pack.sh cuts uploads that fit a call."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MINI, REPO

from tools.core.files import eval_set
from tools.core.layout import Layout
from tools.core.record import engine_rows
from tools.summary import markdown, summarize

CONTRACT = {"name", "profile", "level", "batch", "latency_ms_p50", "latency_ms_p99", "throughput_ips", "map50_95",
            "map50", "engine_mb", "build_s"}


def record(name, profile, batch, eval_key, graph=True):
    timing = {"batch": batch, "cuda_graph": graph, "latency_ms_p50": 0.8, "latency_ms_p99": 0.9,
              "throughput_ips": 1250.0}
    return {"name": name, "key": f"{name}{profile}{eval_key}", "gpu": "G", "trt_version": "8.6.1", "level": 3,
            "profile": {"name": profile, "min": batch, "opt": batch, "max": batch}, "bench": [timing],
            "accuracy": {"map50_95": 0.37, "map50": 0.53, "halves": {"a": {"map50_95": 0.36}, "b": {"map50_95": 0.38}}},
            "build": {"engine_mb": 12.0, "build_s": 70.0}, "eval": {"key": eval_key}, "updated_utc": "2026-11-27"}


def test_summary_holds_only_this_evaluation_sets_records(tmp_path):
    layout = Layout("yolo11n", REPO, tmp_path)
    key = eval_set(MINI)["key"]
    for rec in (record("fp16", "b1", 1, key), record("fp16", "b32", 32, key), record("int8-qdq", "b1", 1, "other")):
        layout.write_json(layout.points / f"{rec['name']}.{rec['profile']['name']}.{rec['key']}.json", rec)
    layout.write_json(layout.onnxrt / "fp32.k.json", {"kind": "fp32", "map50_95": 0.41, "map50": 0.56, "images": 32,
                                                      "eval": {"key": key}})
    s = summarize(layout, ["fp16", "int8-qdq"], MINI)
    assert [(e["name"], e["profile"]) for e in s["engines"]] == [("fp16", "b1"), ("fp16", "b32")]
    assert all(CONTRACT <= set(e) for e in s["engines"]) and s["onnxrt"]["fp32"]["map50_95"] == 0.41
    assert s["engines"][0]["map50_95_a"] == 0.36 and s["published"] is None
    text = markdown(s)
    assert "| fp16 | b32 | 3 | 32 | - | - | - | 0.800 | 0.900 | 1,250 |" in text


def test_a_run_without_engines_says_so_and_points_to_the_published_table(tmp_path):
    layout = Layout("yolo11n", REPO, tmp_path)
    s = summarize(layout, ["fp16"], MINI)
    assert not s["engines"] and s["published"]["path"] == "results/yolo11n/summary.json"
    text = markdown(s)
    assert "No engine was built or timed in this run" in text and "they are not results of this run" in text


def test_graph_only_timings_fill_the_graph_columns():
    rows = engine_rows(record("fp16", "b1", 1, "k"))
    assert rows[0]["cuda_graph"] is True and rows[0]["latency_ms_p50"] == 0.8


def make(*args):
    return subprocess.run(["make", "-s", f"PY={sys.executable}", *args], cwd=REPO, capture_output=True, text=True)


def test_make_help_lists_every_knob():
    knobs = re.search(r"^KNOBS = (.*?)(?<!\\)$", (REPO / "Makefile").read_text(), re.M | re.S).group(1)
    help_text = make("help").stdout
    for knob in knobs.replace("\\\n", " ").split():
        assert f"  {knob} (" in help_text, knob
    assert "make sweep" in help_text and "make profile" in help_text


def test_pixi_tasks_mirror_the_make_targets():
    tomllib = pytest.importorskip("tomllib")
    targets = set(re.findall(r"^([a-z0-9-]+):.*?##", (REPO / "Makefile").read_text(), re.M)) - {"help"}
    tasks = tomllib.loads((REPO / "pixi.toml").read_text())["tasks"]
    assert tasks == {t: f"make {t} PY=python" for t in targets}


@pytest.mark.parametrize("knob,flag", [("ONNX=other.onnx", '--onnx "other.onnx"'), ("RESULTS=out", '--results "out"'),
                                       ("OVERWRITE=1", "--overwrite"), ("PROFILES=b32", "--profiles b32"),
                                       ("EVAL_LIMIT=8", "--eval-limit 8"), ("TRT_VERSION=11", "--trt 11"),
                                       ("CALIB_DIR=elsewhere", "--calib-dir \"elsewhere\""),
                                       ("CALIB_IMAGES=16", "--calib-images 16")])
def test_every_knob_reaches_the_tools(knob, flag):
    out = make("-n", "cpu", knob).stdout
    assert flag in out, out


def test_calibration_cap_only_for_the_shipped_images():
    assert "--calib-images 32" in make("-n", "cpu").stdout
    assert "--calib-images" not in make("-n", "cpu", "CALIB_DIR=../shared/assets/coco/calib").stdout


def test_make_refuses_unknown_recipe():
    res = make("engine", "RECIPE=recipes/nope.yaml")
    assert res.returncode != 0 and "int8-qdq.yaml" in res.stderr


def test_committed_summary_is_a_published_table():
    s = json.loads((REPO / "results/yolo11n/summary.json").read_text())
    assert s["engines"] and s["gpu"] and s["tensorrt"]


def test_summary_reads_the_onnxrt_results_the_pipeline_writes(tmp_path):
    """The onnxrt stage's own result files (not hand-made ones) go through the summary's newest-result rule."""
    import tools.pipeline as pipeline
    from tools.core.recipe import load
    from tools.core.setup import Setup

    s = Setup(calib_dir=REPO / "calib/images", eval_dir=MINI, results=tmp_path, eval_limit=2)
    point = pipeline.Point(load(REPO / "recipes/fp16.yaml"), s)
    pipeline.onnxrt_score(point, point.model_onnx)
    summary = summarize(Layout("yolo11n", REPO, tmp_path), ["fp16"], MINI, 2)
    assert summary["onnxrt"]["fp32"]["images"] == 2


def test_a_random_weight_model_shows_no_accuracy(tmp_path):
    layout = Layout("yolo11n", REPO, tmp_path)
    key = eval_set(MINI)["key"]
    rec = record("fp16", "b1", 1, key)
    layout.write_json(layout.points / "fp16.b1.x.json", rec)
    layout.write_json(layout.onnxrt / "fp32.k.json", {"kind": "fp32", "map50_95": 0.0, "map50": 0.0, "images": 32,
                                                      "eval": {"key": key}})
    text = markdown(summarize(layout, ["fp16"], MINI, speed_only=True))
    assert "Speed only" in text and "0.0000" not in text and "| fp16 | b1 | 3 | 1 |" in text


def test_devkit_pack_cuts_parts_that_fit_a_call_and_rebuild_what_was_cut(tmp_path):
    """tools/devkit_pack.sh (the uploads to our lent GPU machines): each part fits one call beside the tracked tree
    (64 MiB in all), the parts joined give back the image folders under the names tools/devkit_run.sh unpacks, the
    models a CPU sweep's records name that git does not track (Q/DQ ones with their .json), and a record naming a model
    that is not there is refused in one line."""
    import tarfile

    from conftest import CALIB

    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "DEVPARTS": str(tmp_path / "parts")}
    run = lambda *args: subprocess.run(["bash", "tools/devkit_pack.sh", *args], cwd=REPO, env=env,  # noqa: E731
                                       capture_output=True, text=True)
    usage = run("--help")
    assert usage.returncode == 0 and all(f"devkit_pack.sh {mode}" in usage.stdout for mode in ("kit", "data", "quant"))
    assert "set -e" not in usage.stdout and run("nonsense").returncode == 2
    res = run("data", str(MINI), str(CALIB))
    assert res.returncode == 0, res.stdout + res.stderr
    tracked = sum((REPO / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True).stdout.split("\0") if f)
    parts = sorted((tmp_path / "parts" / "data").iterdir())
    assert parts and all(p.stat().st_size + tracked <= 64 * 1024 * 1024 - 2_000_000 for p in parts)

    def joined(prefix):
        whole = tmp_path / f"{prefix}.tar"
        whole.write_bytes(b"".join(p.read_bytes() for p in parts if p.name.startswith(prefix + ".tar.")))
        with tarfile.open(whole) as tar:
            return {m.name for m in tar.getmembers() if m.isfile()}
    assert {n.split("/", 1)[1] for n in joined("eval") if "/images/" in n} == \
        {f"images/{p.name}" for p in (MINI / "images").iterdir()}
    assert joined("calib") == {f"calib/{p.name}" for p in CALIB.iterdir()}

    quant = tmp_path / "models" / "yolo11n" / "quant"
    quant.mkdir(parents=True)
    records = tmp_path / "results" / "yolo11n" / "onnxrt"
    records.mkdir(parents=True)
    untracked = tmp_path / "models" / "yolo11" / "yolo11m.onnx"  # a float model the tree does not carry
    untracked.parent.mkdir()
    untracked.write_bytes(b"onnx")
    for name, onnx in (("fp32", "models/yolo11/yolo11n.onnx"), ("q", quant / "q.abc.onnx"), ("m", untracked)):
        (records / f"{name}.json").write_text(json.dumps({"onnx": str(onnx)}))
    (quant / "q.abc.onnx").write_bytes(b"onnx")
    (quant / "q.abc.json").write_text("{}")
    assert run("quant", str(tmp_path / "results"), "yolo11n").returncode == 0
    parts = sorted((tmp_path / "parts" / "data").iterdir())
    assert joined("quant") == {str(p).lstrip("/") for p in (quant / "q.abc.onnx", quant / "q.abc.json", untracked)}
    (quant / "q.abc.onnx").unlink()
    res = run("quant", str(tmp_path / "results"), "yolo11n")
    assert res.returncode == 2 and res.stdout.count("\n") == 1
    assert "q.abc.onnx" in res.stdout and "is missing" in res.stdout
