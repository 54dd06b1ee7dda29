"""The committed GPU results honour the summary contract; the Makefile's help, knobs and recipe check work."""
import json
import subprocess

from conftest import REPO

from tools.summary import markdown, summarize

CONTRACT = {"name", "batch", "latency_ms_p50", "latency_ms_p99", "throughput_ips", "map50_95", "map50", "engine_mb",
            "build_s"}


def test_summary_contract_from_committed_records():
    s = summarize("yolo11n")
    assert {"gpu", "tensorrt", "eval_images", "calib_images", "onnx_fp32_map50_95", "engines"} <= set(s)
    assert s["eval_images"] == 900 and s["calib_images"] == 400
    assert {(e["name"], e["batch"]) for e in s["engines"]} == \
        {(n, b) for n in ("fp16", "int8-qdq", "int8-implicit", "int8-ultralytics") for b in (1, 8, 32)}
    for e in s["engines"]:
        assert CONTRACT <= set(e) and e["latency_ms_p50"] <= e["latency_ms_p99"] and e["throughput_ips"] > 0
    committed = json.loads((REPO / "results/yolo11n/summary.json").read_text())
    assert committed["engines"] == json.loads(json.dumps(s["engines"]))
    assert "| int8-ultralytics | 32 |" in markdown(s)


def make(*args):
    return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True)


def test_make_help_and_knobs():
    assert "make sweep" in make("help").stdout
    assert make("print-MODEL", "MODEL=yolo11s").stdout.strip() == "MODEL=yolo11s"


def test_make_refuses_unknown_recipe():
    res = make("engine", "RECIPE=recipes/yolo11n/nope.yaml")
    assert res.returncode != 0 and "int8-qdq.yaml" in res.stderr
