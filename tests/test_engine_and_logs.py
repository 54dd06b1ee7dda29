"""trtexec command lines from recipes, the fallback's flag parsing and build server, and the log parser on real
trtexec text."""
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MODEL, REPO, run_tool

from tools.core.errors import UserError
from tools.core.recipe import load
from tools.engine import build_args, onnx_nodes, resolve_layer_precisions
from tools.trt_plan import plan
from tools.trtexec_py import parse_flags, parse_layer_spec, parse_shapes, stats_line
from tools.trtlog import parse


def test_ultralytics_head_constraints_resolve_on_the_real_graph():
    r = load(REPO / "recipes/int8-implicit.yaml")
    chosen = resolve_layer_precisions(r, onnx_nodes(MODEL))
    fp16 = sorted(n for n, p in chosen.items() if p == "fp16")
    assert "/model.23/dfl/conv/Conv" in fp16 and len(fp16) == 7  # 6 x ".2/Conv" + DFL
    assert all(n.startswith("/model.23/") and "Sigmoid" in n for n, p in chosen.items() if p == "fp32")


def test_rule_matching_nothing_is_an_error():
    r = load(REPO / "recipes/int8-implicit.yaml").replace(
        layer_precisions=[{"match": "^/model\\.99/", "precision": "fp32"}])
    with pytest.raises(UserError, match="matches no node"):
        resolve_layer_precisions(r, onnx_nodes(MODEL))


def test_build_args_and_the_fallback_accepts_them():
    r = load(REPO / "recipes/int8-implicit.yaml")
    p = plan(r, "8.6")
    lp = resolve_layer_precisions(r, onnx_nodes(MODEL))
    args = build_args(r, "b32", p, "m.onnx", "e.engine", "t.cache", "c.cache", lp)
    opts = parse_flags(args)
    assert opts["fp16"] and opts["int8"] and opts["calib"] == "c.cache"
    assert parse_shapes(opts["minShapes"]) == parse_shapes(opts["maxShapes"]) == {"images": (32, 3, 640, 640)}
    assert parse_layer_spec(opts["layerPrecisions"]) == lp
    assert "--precisionConstraints=obey" in args and "--builderOptimizationLevel=3" in args
    assert opts["profilingVerbosity"] == "detailed"  # so `make profile` can read every layer's precision
    assert opts["avgTiming"] == "8"  # trtexec's default, explicit: the fallback's builder API would time tactics once
    b1 = parse_flags(build_args(r, "b1", p, "m.onnx", "e.engine", calib_cache="c.cache"))
    assert parse_shapes(b1["optShapes"]) == {"images": (1, 3, 640, 640)}


def test_strongly_typed_build_has_no_precision_flags():
    r = load(REPO / "recipes/int8-qdq.yaml")
    args = build_args(r, "b1", plan(r, "11"), "m.onnx", "e.engine")
    assert "--stronglyTyped" in args and "--fp16" not in args and "--int8" not in args


def test_fallback_refuses_unknown_flags():
    with pytest.raises(UserError, match="--sparsity"):
        parse_flags(["--onnx=m.onnx", "--sparsity=enable"])
    with pytest.raises(UserError, match="exactly one"):
        parse_flags(["--fp16"])


def test_parse_real_trtexec_log():
    text = (REPO / "tests/data/trtexec_10.x_summary.log").read_text()
    row = parse(text)
    assert row["throughput_qps"] == pytest.approx(130.298)
    assert row["gpu_median_ms"] == pytest.approx(7.14139)
    assert row["gpu_p99_ms"] == pytest.approx(12.9485)
    assert row["latency_p90_ms"] == pytest.approx(10.2996)
    assert row["walltime_s"] == pytest.approx(3.00082)
    assert not row["fallback"] and row["h2d_median_ms"] == pytest.approx(0.00814819)


def test_parse_real_fallback_logs():
    build = parse((REPO / "tests/data/trtexec_py_build.log").read_text())
    assert build["fallback"] and build["build_s"] > 0 and build["engine_mib"] > 1
    bench = parse((REPO / "tests/data/trtexec_py_bench.log").read_text())
    assert bench["fallback"] and 0 < bench["gpu_median_ms"] <= bench["gpu_p99_ms"]
    assert bench["throughput_qps"] > 0 and bench["activation_bytes"] > 0
    # the tactic-timing average is read from the command line heading a log, and only where it was given
    published = REPO / "results/yolo11s/logs/int8-qdq.b32.6a5461755652.build.log"
    assert parse(published.read_text())["avg_timing"] == 8 and "avg_timing" not in build


def test_fallback_stats_line_round_trips():
    values = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    row = parse("[I] GPU Compute Time: " + stats_line("x", values, [90, 99]).split(": ", 1)[1])
    assert row["gpu_median_ms"] == 3.0 and row["gpu_min_ms"] == 1.0 and row["gpu_max_ms"] == 10.0


def test_fallback_help_lists_every_flag_the_recipes_use():
    """`python -m tools.trtexec_py --help` works without TensorRT and names each flag build_args can emit."""
    from conftest import run_tool

    out = run_tool("tools.trtexec_py", "--help")
    assert out.returncode == 0 and "not trtexec" in out.stdout
    r = load(REPO / "recipes/int8-qdq.yaml")
    for arg in build_args(r, "b1", plan(r, "8.6"), MODEL, "x.engine", timing_cache="t.cache"):
        assert arg[2:].split("=")[0] in out.stdout


def test_build_server_answers_builds_and_refuses_the_rest(tmp_path, capsys):
    """The sweep's build server protocol on the CPU, with a stand-in for TensorRT's builder: each build's engine is
    written whole (through a temporary file) where --saveEngine says, a failed build writes nothing and answers exit
    code 2 with its one-line error, the server goes on serving, and a client finding no server builds itself."""
    import tempfile
    import threading

    from tools.trtexec_py import BuildServer, build_on_server, stop_server

    def fake_build(opts, out):
        out(f"[I] building {opts['onnx']}")
        if opts["onnx"] == "bad.onnx":
            raise UserError("bad.onnx: not an ONNX model")
        return b"PLAN:" + opts["onnx"].encode()

    address = str(Path(tempfile.mkdtemp(dir="/tmp")) / "s.sock")  # AF_UNIX paths must stay short
    server = threading.Thread(target=BuildServer(fake_build, "fake").serve, args=(address,), daemon=True)
    server.start()
    for _ in range(100):
        if Path(address).exists():
            break
        time.sleep(0.05)
    good, bad = tmp_path / "good.engine", tmp_path / "bad.engine"
    assert build_on_server(address, ["--onnx=m.onnx", f"--saveEngine={good}", "--skipInference"]) == 0
    assert good.read_bytes() == b"PLAN:m.onnx"
    assert build_on_server(address, ["--onnx=bad.onnx", f"--saveEngine={bad}", "--skipInference"]) == 2
    assert not bad.exists() and not list(tmp_path.glob(".bad.engine*"))
    assert build_on_server(address, ["--loadEngine=x.engine"]) == 2
    assert build_on_server(address, ["--onnx=n.onnx", f"--saveEngine={good}", "--skipInference"]) == 0
    out = capsys.readouterr().out
    assert "build 1 of this process" in out and "build 4 of this process" in out
    assert "error: bad.onnx: not an ONNX model" in out and "only builds (--onnx=...) are served" in out
    assert good.read_bytes() == b"PLAN:n.onnx"
    stop_server(address)
    server.join(timeout=10)
    assert not server.is_alive()
    assert build_on_server(address + ".none", ["--onnx=m.onnx"]) is None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tools_that_need_tensorrt_say_so_in_one_line(tmp_path):
    """Without TensorRT the fallback trtexec (build or timing) and engine scoring name what is missing, no traceback."""
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not a plan")
    for args in (("tools.trtexec_py", f"--onnx={MODEL}", "--skipInference"),
                 ("tools.trtexec_py", f"--loadEngine={engine}"),
                 ("tools.evaluate", str(engine), "--images", str(REPO / "data/coco-mini"))):
        res = run_tool(*args)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "needs TensorRT's Python package" in res.stderr and "Traceback" not in res.stderr
