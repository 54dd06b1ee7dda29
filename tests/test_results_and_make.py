"""The committed GPU results honour the summary contract; the Makefile's help, knobs and recipe check work."""
import json
import subprocess

from conftest import REPO

from tools.summary import engine_rows, markdown, summarize

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


def test_graph_only_timings_fill_the_graph_columns():
    """A sweep record holds CUDA-graph runs only: the summary must not present them as plain runs."""
    timing = {"latency_ms_p50": 0.8, "latency_ms_p99": 0.9, "throughput_ips": 1250.0}
    rec = {"name": "fp16", "gpu": "G", "trt_version": "8.6.1", "bench": [{"batch": 1, "cuda_graph": True, **timing}],
           "accuracy": {"map50_95": 0.37, "map50": 0.53}, "build": {"engine_mb": 12.0, "build_s": 70.0}}
    rows = engine_rows(rec)
    assert rows[0]["cuda_graph"] is True and rows[0]["latency_ms_p50"] == 0.8
    line = markdown({"gpu": "G", "tensorrt": "8.6.1", "eval_images": 1, "calib_images": 1, "onnx_fp32_map50_95": 0.37,
                     "engines": rows}).splitlines()[-1]
    assert line.startswith("| fp16 | 1 | - | - | - | 0.800 | 0.900 | 1,250 |")
    rec["bench"].append({"batch": 1, "cuda_graph": False, **timing, "latency_ms_p50": 1.0})
    both = markdown({"gpu": "G", "tensorrt": "8.6.1", "eval_images": 1, "calib_images": 1, "onnx_fp32_map50_95": 0.37,
                     "engines": engine_rows(rec)}).splitlines()[-1]
    assert both.startswith("| fp16 | 1 | 1.000 | 0.900 | 1,250 | 0.800 | 0.900 | 1,250 |")


def make(*args):
    return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True)


def test_make_help_and_knobs():
    assert "make sweep" in make("help").stdout
    assert make("print-MODEL", "MODEL=yolo11s").stdout.strip() == "MODEL=yolo11s"


def test_make_refuses_unknown_recipe():
    res = make("engine", "RECIPE=recipes/yolo11n/nope.yaml")
    assert res.returncode != 0 and "int8-qdq.yaml" in res.stderr
