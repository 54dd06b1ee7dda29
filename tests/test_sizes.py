"""The size table (tools.sizes) from the published sweeps: each model's FP16/INT8 ratio from its own run, sizes
ordered smallest first, the per-layer conv speed-up and the tactic-timing average read from what the run wrote,
models without a sweep named, and committed tables kept unless asked."""
import csv
import json
import shutil

import pytest
from conftest import REPO, run_tool

from tools.sizes import markdown, size_table

RESULTS = REPO / "results"


def published(model):
    return json.loads((RESULTS / model / "sweep.json").read_text())


def row_of(sweep, config, profile):
    rows = [r for r in sweep["rows"] if r["config"] == config and r["profile"] == profile
            and r["level"] == sweep["final_level"]]
    assert len(rows) == 1
    return rows[0]


def test_each_size_compares_fp16_and_int8_of_its_own_run():
    rows, missing = size_table(RESULTS, ["yolo11s", "yolo11n", "yolo11m"], "int8-qdq")
    assert missing == []
    assert [r["model"] for r in rows] == ["yolo11n"] * 2 + ["yolo11s"] * 2 + ["yolo11m"] * 2  # smallest first
    for r in rows:
        sweep = published(r["model"])
        fp16, int8 = row_of(sweep, "fp16", r["profile"]), row_of(sweep, "int8-qdq", r["profile"])
        fast = lambda row: min(v for v in (row["latency_ms_p50"], row.get("latency_ms_p50_cuda_graph")) if v)  # noqa: E731
        assert r["speedup"] == pytest.approx(fast(fp16) / fast(int8), abs=1e-3)
        assert r["level"] == sweep["final_level"] and r["gpu"] == fp16["gpu"] == int8["gpu"]
        with open(RESULTS / r["model"] / "profile" / f"{r['profile']}-L{r['level']}" / "by-block.csv") as f:
            total = next(x for x in csv.DictReader(f) if x["block"] == "all")
        assert r["conv_speedup"] == pytest.approx(float(total["conv_speedup_int8-qdq"]))
    weights = {r["model"]: r["weights"] for r in rows}
    assert weights == {"yolo11n": "trained", "yolo11s": "random (speed only)", "yolo11m": "random (speed only)"}


def test_tactic_timing_average_comes_from_the_build_logs():
    rows, _ = size_table(RESULTS, ["yolo11n", "yolo11s"], "int8-qdq")
    for r in rows:
        sweep = published(r["model"])
        keys = {row_of(sweep, c, r["profile"])["key"] for c in ("fp16", "int8-qdq")}
        logs = [json.loads(next((RESULTS / r["model"] / "points").glob(f"*.{k}.json")).read_text())["build"]["log"]
                for k in keys]
        flags = {"--avgTiming=8" in (REPO / log).read_text().splitlines()[0] for log in logs}
        assert flags == {r["avg_timing"] == 8}
    md = markdown(rows, [], "int8-qdq")
    assert ("avgTiming `-`" in md) == any(r["avg_timing"] is None for r in rows)
    assert "mAP" not in md.split("\n\n")[2]  # the table has no accuracy column, trained model or not


def test_the_tool_writes_both_tables_and_keeps_committed_ones(tmp_path):
    for model in ("yolo11n", "yolo11s"):
        shutil.copytree(RESULTS / model, tmp_path / model, ignore=shutil.ignore_patterns("*.png", "onnxrt"))
    rows, missing = size_table(tmp_path, ["yolo11n", "yolo11s", "yolo11m"], "int8-qdq")
    assert missing == ["yolo11m"] and len(rows) == 4  # a size without a sweep is named, not invented
    res = run_tool("tools.sizes", "--results", str(tmp_path))
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "sizes.md").read_text().splitlines()
    assert sum(line.startswith("| yolo11") for line in lines) == 4
    assert [r["model"] for r in csv.DictReader(open(tmp_path / "sizes.csv"))] == ["yolo11n"] * 2 + ["yolo11s"] * 2
    from tools.core.layout import Layout
    from tools.report import write_report
    report = write_report(Layout("yolo11n", REPO, tmp_path), 0.5).read_text()  # yolo11n's report shows the sizes
    assert "## INT8 over FP16 by model size" in report and "| yolo11s | random (speed only) | b32 | 32 | 3 |" in report
    before = (RESULTS / "sizes.md").read_bytes()  # the published table
    res = run_tool("tools.sizes", "--results", str(RESULTS))
    assert res.returncode == 2 and "is a committed result" in res.stderr and len(res.stderr.splitlines()) == 1
    assert (RESULTS / "sizes.md").read_bytes() == before


def test_no_sweep_is_a_one_line_error(tmp_path):
    res = run_tool("tools.sizes", "--results", str(tmp_path), "--models", "yolo11s")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "no sweep with fp16 and int8-qdq" in res.stderr and "make sweep" in res.stderr
