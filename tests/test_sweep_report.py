"""Grid loading and expansion, the screening flow (cheap level, then the front and the references at the final
level), the table, and the report's selection rule (same-level FP16, half A chooses, half B confirms)."""
import contextlib
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import CALIB, MINI, REPO

import tools.core.setup as setup_mod
import tools.sweep as sweep
from tools.core.errors import UserError
from tools.core.files import digest
from tools.core.grid import expand, load_grid
from tools.core.layout import Layout
from tools.core.recipe import load
from tools.core.sweep_table import Table, sweep_rows
from tools.report import kendall_tau, select, write_report
from tools.sweep import (earlier_runs, front, rebuild_table, run_seconds, run_sweep, shard,
                         this_grids_table)


def write_grid(tmp_path, design="one-at-a-time", extra=None, **top):
    grid = {"model": "yolo11n", "base": "recipes/int8-qdq.yaml", "design": design,
            "references": ["recipes/fp16.yaml", "recipes/int8-qdq.yaml"],
            "axes": {"calibration_method": ["entropy", "max"], "calib_images": [64, 400],
                     "nodes_to_exclude": {"default": ["/model\\.10/.*attn.*"], "none": []}, **(extra or {})}, **top}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def setup(tmp_path, **kw):
    return setup_mod.Setup(calib_dir=CALIB, eval_dir=MINI, root=REPO, results=tmp_path, trt_version="8.6.1", **kw)


def test_a_run_level_applies_to_every_point_but_not_to_a_screened_grid(tmp_path, capsys):
    """LEVEL= builds references and points at one level (so their settings, and every key, differ from the recipes'
    own); a screened grid has levels of its own, so the two together are refused in one line."""
    assert {r.builder_optimization_level for r in expand(load_grid(write_grid(tmp_path), REPO),
                                                          setup(tmp_path, level=1))} == {1}
    listed = []
    for level in ([], ["--level", "1"]):
        sweep.main([str(write_grid(tmp_path)), "--results", str(tmp_path), "--list", *level])
        listed.append(capsys.readouterr().out.splitlines())
    assert len(listed[0]) == len(listed[1]) > 2 and not set(listed[0]) & set(listed[1])
    screened = write_grid(tmp_path, screen={"builder_optimization_level": 1})
    with pytest.raises(UserError, match="screened grid"):
        sweep.main([str(screened), "--results", str(tmp_path), "--level", "2", "--list"])


def test_one_at_a_time_expansion(tmp_path):
    points = expand(load_grid(write_grid(tmp_path), REPO))
    assert [p.name for p in points] == ["fp16", "int8-qdq", "qdq-max-n400-x-default", "qdq-entropy-n64-x-default",
                                        "qdq-entropy-n400-x-none"]
    assert len({digest(p.settings()) for p in points}) == len(points)


def test_product_expansion(tmp_path):
    assert len(expand(load_grid(write_grid(tmp_path, "product"), REPO))) == 2 + 2 * 2 * 2 - 1


def test_calibration_cap_renames_and_merges_points(tmp_path):
    """With 32 calibration images, the n64 and n400 points are the same n32 point: one point, named for what ran."""
    grid = load_grid(write_grid(tmp_path), REPO)
    names = [p.name for p in expand(grid, setup(tmp_path, calib_images=32))]
    assert names == ["fp16", "int8-qdq", "qdq-max-n32-x-default", "qdq-entropy-n32-x-none"]


def test_default_grid_builds_everything_at_the_deployed_level():
    """The default grid has no screening level: every engine, references included, at TensorRT's default level 3 (the
    published run measured every point and profile of it there); the wide search screens at level 1."""
    grid = load_grid(REPO / "recipes/grids/yolo11n.yaml", REPO)
    points = expand(grid)
    assert grid.screen is None and {p.builder_optimization_level for p in points} == {3}
    assert [p.name for p in points][:5] == ["fp16", "int8-dfl-mse", "int8-qdq", "int8-implicit", "int8-ultralytics"]
    # base collapsed into its reference: 1 calibration + 2 placements + 1 rewrite, and issue 19's two graph rewrites
    assert len(points) == 11
    wide = load_grid(REPO / "recipes/grids/yolo11n-wide.yaml", REPO)
    assert wide.screen.builder_optimization_level == 1 and wide.base.builder_optimization_level == 3
    published = json.loads((REPO / "results/yolo11n/sweep.json").read_text())
    assert published["grid"] == "recipes/grids/yolo11n.yaml" and published["complete"]
    measured = {(r["config"], r["profile"]) for r in published["rows"] if r["level"] == 3}
    added_since = {"int8-dfl-mse-split", "int8-dfl-mse-fused"}  # the next default-grid run measures them
    assert measured == {(p.name, prof) for p in points if p.name not in added_since for prof in ("b1", "b32")}


def test_a_field_at_its_omitted_default_leaves_keys_and_names_alone():
    """`qdq_rewrites` came after the published sweep: at its default it is in no key and no point name, so the
    points measured before keep their keys; set, it names its point and changes its key."""
    grid = load_grid(REPO / "recipes/grids/yolo11n.yaml", REPO)
    points = {p.name: p for p in expand(grid)}
    assert "qdq-entropy-x-dfl" in points and "qdq_rewrites" not in points["qdq-entropy-x-dfl"].settings()
    rewritten = points["qdq-mse-x-dfl-r-concat"]
    assert rewritten.settings()["qdq_rewrites"] == ["concat"]
    assert digest(rewritten.replace(qdq_rewrites=[]).settings()) == digest(points["int8-dfl-mse"].settings())
    wide = {p.name: p for p in expand(load_grid(REPO / "recipes/grids/yolo11n-wide.yaml", REPO))}
    assert digest(wide["qdq-entropy-n400-x-dfl"].settings()) == digest(points["qdq-entropy-x-dfl"].settings())


@pytest.mark.parametrize("mutate,expected", [
    (lambda g: g["axes"].update(learning_rate=[1]), "not a recipe key"),
    (lambda g: g.update(bench={"duraton_s": 1}), "unknown key `bench.duraton_s`"),
    (lambda g: g.pop("base"), "key `base` is required"),
    (lambda g: g.update(references="recipes/fp16.yaml"), "references"),
    (lambda g: g.update(design="random"), "design"),
    (lambda g: g["axes"].update(nodes_to_exclude={"s": {"from": "no/such.json", "x": 1}}), "from"),
])
def test_bad_grids_are_one_line_errors(tmp_path, mutate, expected):
    path = write_grid(tmp_path)
    g = yaml.safe_load(path.read_text())
    mutate(g)
    path.write_text(yaml.safe_dump(g))
    with pytest.raises(UserError) as e:
        load_grid(path, REPO)
    assert expected in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_grid_yaml_error_and_bad_proposal(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("base: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_grid(path, REPO)
    proposal = tmp_path / "sens.json"
    proposal.write_text(json.dumps({"blocks": []}))
    grid = write_grid(tmp_path, extra={"nodes_to_exclude": {"s": {"from": str(proposal)}}})
    with pytest.raises(UserError, match="no proposal.nodes_to_exclude"):
        load_grid(grid, REPO)


def fake_record(recipe, profile, ms, m, level=None):
    batch = recipe.profiles[profile].max
    level = recipe.builder_optimization_level if level is None else level
    return {"name": recipe.name, "key": digest([recipe.name, profile, level]), "precision": recipe.precision,
            "onnx": "models/yolo11/yolo11n.onnx",
            "recipe": {**json.loads(json.dumps(recipe.model_dump())), "builder_optimization_level": level},
            "level": level, "profile": {"name": profile, "min": batch, "opt": batch, "max": batch},
            "gpu": "G", "trt_version": "8.6.1", "build": {"engine_mb": 5.0, "build_s": 10.0, "engine": "engines/x.engine"},
            "bench": [{"batch": batch, "cuda_graph": True, "latency_ms_p50": ms * batch ** 0.5,
                       "latency_ms_p99": ms * 1.1, "throughput_ips": 1000 * batch ** 0.5 / ms}],
            "accuracy": {"map50_95": m, "map50": m + 0.15, "halves": {"a": {"map50_95": m}, "b": {"map50_95": m}}}}


def test_screening_then_front_and_references_at_the_final_level(tmp_path):
    grid = load_grid(write_grid(tmp_path, screen={"builder_optimization_level": 1, "front_max": 1}), REPO)
    speed = {"fp16": 1.0, "int8-qdq": 0.8, "qdq-max-n400-x-default": 0.7, "qdq-entropy-n64-x-default": 0.9,
             "qdq-entropy-n400-x-none": 0.6}
    accuracy = {"fp16": 0.37, "int8-qdq": 0.36, "qdq-max-n400-x-default": 0.35, "qdq-entropy-n64-x-default": 0.355,
                "qdq-entropy-n400-x-none": 0.30}
    calls, order = [], []

    def runner(pairs, stages, stop_after, then=None, gate=None):
        """Like Runner.run: the records of `pairs`, then `then` on the `gate` ones, whose points run too."""
        calls.append(sorted({(r.name, r.builder_optimization_level) for r, _ in pairs}))
        order.append([(r.name, r.builder_optimization_level) for r, _ in pairs])
        assert {r.builder_optimization_level for r, _ in gate} == {1}  # the front waits for the screening only
        done = [fake_record(r, p, speed[r.name], accuracy[r.name]) for r, p in pairs]
        more = then([d for d in done if d["level"] == 1]) if then else []
        if more:
            calls.append(sorted({(r.name, r.builder_optimization_level) for r, _ in more}))
        return done + [fake_record(r, p, speed[r.name], accuracy[r.name]) for r, p in more], {}

    records, failures = run_sweep(grid, setup(tmp_path), ("engine", "bench", "accuracy"), runner)
    # first the references at their own level 3 and every configuration at the screening level 1 ...
    assert not failures and calls[0] == sorted([(n, 1) for n in speed] + [("fp16", 3), ("int8-qdq", 3)])
    # queued: FP16 and the base at level 3 (the yardsticks), the screening, then the other references at level 3
    assert order[0][:2] == [("fp16", 3), ("fp16", 3)] and order[0][2:4] == [("int8-qdq", 3)] * 2
    assert {lvl for _, lvl in order[0][4:]} == {1}
    # ... then the front (fastest first, at most front_max) at level 3
    assert calls[1] == [("qdq-entropy-n400-x-none", 3)]
    assert len(records) == 2 * (5 + 3)


def test_front_is_pareto_per_profile():
    rows = [{"config": c, "profile": "b1", "batch": 1, "latency_ms_p50": ms, "throughput_ips": 1 / ms, "map50_95": m}
            for c, ms, m in (("fp16", 1.0, 0.37), ("a", 0.8, 0.36), ("b", 0.9, 0.35), ("c", 0.7, 0.30))]
    assert front(rows, 5) == ["c", "a"]  # b is slower and less accurate than a


def test_pareto_keeps_ties_and_drops_the_dominated():
    """One rule for the sweep's front and the report's plots: two configurations measuring the same both stay."""
    from tools.core.sweep_table import pareto
    pts = {"a": (0.8, 0.36), "twin": (0.8, 0.36), "b": (0.9, 0.35), "c": (0.7, 0.30), "d": (0.7, 0.29)}
    assert pareto(pts) == ["c", "a", "twin"]


def test_a_sweep_of_another_grid_leaves_the_table_it_would_replace(tmp_path):
    """One sweep table per model in a results folder: a sweep (or --table-only) of another grid there is refused in
    one line naming the table and the fix, and the table stays as it was; the table's own grid goes ahead."""
    layers = write_grid(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(layers.read_text())
    table = tmp_path / "yolo11n" / "sweep.json"
    table.parent.mkdir()
    table.write_text(json.dumps({"grid": str(layers), "complete": True, "run_seconds": [1075], "rows": []}))
    before = table.read_bytes()
    for extra in (["--table-only"], ["--stages", "engine"]):
        with pytest.raises(UserError, match=rf"sweep.json: the table of {layers}; a sweep of {other} would replace "
                                            rf"it: give this grid its own results folder \(RESULTS=DIR"):
            sweep.main([str(other), "--results", str(tmp_path), *extra])
    assert table.read_bytes() == before and sorted(p.name for p in table.parent.iterdir()) == ["sweep.json"]
    for same in (layers, f"{tmp_path}/./{layers.name}", os.path.relpath(layers, REPO)):  # however its path is spelt
        with pytest.raises(UserError, match="no complete record of any point of this grid"):
            sweep.main([str(same), "--results", str(tmp_path), "--table-only"])


def test_wall_time_adds_up_over_resumed_runs(tmp_path):
    table = tmp_path / "sweep.json"
    assert earlier_runs(this_grids_table(table, "g.yaml")) == ([], False)
    table.write_text(json.dumps({"grid": "g.yaml", "complete": False, "run_seconds": [400, 380]}))
    assert earlier_runs(this_grids_table(table, "g.yaml")) == ([400, 380], False)
    assert run_seconds([400, 380], False, 90, measured=True) == [400, 380, 90]
    assert run_seconds([400, 380, 90], True, 5, measured=False) == [400, 380, 90]
    assert run_seconds([400, 380, 90], True, 700, measured=True) == [700]


def test_shards_cover_every_point_once():
    points = list(range(11))
    assert sorted(shard(points, "1/3") + shard(points, "2/3") + shard(points, "3/3")) == points
    with pytest.raises(UserError, match="--shard"):
        shard(points, "4/3")


def rows_for(records, grid):
    return sweep_rows(records, grid)


def test_selection_rule_same_level_fp16_and_halves():
    rows = []
    for level, scale in ((1, 1.1), (3, 1.0)):
        for c, prec, ms, a, b in (("fp16", "fp16", 1.0, 0.400, 0.400), ("fast-bad", "int8-qdq", 0.6, 0.390, 0.390),
                                  ("ok", "int8-qdq", 0.8, 0.397, 0.396), ("wide", "int8-implicit", 0.85, 0.399, 0.388)):
            for profile, batch in (("b1", 1), ("b32", 32)):
                ms_batch = ms * scale * (1 if batch == 1 else 2.5 if c == "wide" else 4)  # wide: best at batch 32
                rows.append({"config": c, "precision": prec, "level": level, "profile": profile, "batch": batch,
                             "latency_ms_p50": ms_batch, "throughput_ips": batch / ms_batch * 1000,
                             "map50_95": (a + b) / 2, "map50_95_a": a, "map50_95_b": b})
    table = Table(rows, final_level=3)
    choice = select(table, budget=0.5)
    assert choice["level"] == 3 and choice["latency"] == "ok" and choice["throughput"] == "wide"
    assert select(table, 2.0)["latency"] == "fast-bad"
    none = select(table, 0.0)
    assert none["latency"] is None and none["closest"] == "wide"  # the most accurate INT8 (on half A)
    # accurate INT8 engines slower than FP16 (bad batch-1 builds, say) are never the choice
    slow = [dict(r, latency_ms_p50=r["latency_ms_p50"] * 2, throughput_ips=r["throughput_ips"] / 2)
            if r["config"] != "fp16" else r for r in rows]
    assert select(Table(slow, final_level=3), budget=0.5)["latency"] is None


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0


@pytest.mark.parametrize("model,knob", [("yolo11n", ""), ("yolo11s", " MODEL=yolo11s")])
def test_report_end_to_end_from_records(tmp_path, model, knob):
    """A sweep table and its records -> REPORT.md with the choice, the half-B confirmation, the recorded build
    command and the screening section; chosen.yaml rebuilds the chosen recipe, and the commands run it on its size
    (make's MODEL= is yolo11n unless given)."""
    grid = load_grid(write_grid(tmp_path, screen={"builder_optimization_level": 1}, model=model), REPO)
    layout = Layout(model, tmp_path, tmp_path / "runs")
    recipes = {r.name: r for r in expand(grid)}
    cfg = {"fp16": (1.0, 0.370), "int8-qdq": (0.8, 0.368), "qdq-max-n400-x-default": (0.75, 0.35)}
    records = []
    for name, (ms, m) in cfg.items():
        for level in (1, 3):
            for profile in ("b1", "b32"):
                rec = fake_record(recipes[name], profile, ms * (1.2 if level == 1 else 1), m, level)
                log = tmp_path / "logs" / f"{name}.{profile}.{level}.build.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(f"# /usr/bin/python3 -m tools.trtexec_py --onnx=/gpu/scratch/m.onnx "
                               f"--saveEngine=/gpu/scratch/.x.tmp.engine --builderOptimizationLevel={level}\n")
                rec["build"]["log"] = str(log)
                layout.write_json(layout.points / f"{name}.{profile}.{rec['key']}.json", rec)
                records.append(rec)
    layout.write_json(layout.out / "sweep.json", {"grid": "g.yaml", "design": "one-at-a-time", "points": len(records),
                                                  "rows": sweep_rows(records, grid), "screen_level": 1,
                                                  "final_level": 3, "run_seconds": [100], "gpus": ["0", "1"]})
    text = write_report(layout, 0.5).read_text()
    assert "**Chosen (latency, profile `b1`): `int8-qdq`**" in text and "half B, which confirms it" in text
    assert "`trtexec --onnx=models/yolo11/yolo11n.onnx --saveEngine=engines/x.engine --builderOptimizationLevel=3`" in text
    assert f"make quantize RECIPE=recipes/{model}/chosen.yaml{knob} CALIB_DIR=" in text
    assert f"mkdir -p recipes/{model}\ncp " in text  # cp into a folder a clean clone lacks would fail
    assert "## Screening at level 1 against level 3" in text and "| b1 | 1 | 3 | 1.00 |" in text
    assert load(layout.out / "chosen.yaml", model).name == "int8-qdq"
    assert (layout.out / "pareto_latency.png").stat().st_size > 10_000
    rebuild_table(grid, layout, setup(tmp_path))  # the table again from the records alone
    assert len(json.loads((layout.out / "sweep.json").read_text())["rows"]) == len(records)


def test_runner_adds_the_front_once_the_screening_is_done(tmp_path, monkeypatch):
    """The Runner's own bookkeeping with a fake launcher: every screening chain ends before the front is asked for,
    the front's chains run on the GPUs, and each chain's record is read after its last job."""
    from tools.sweep import Runner

    grid = load_grid(write_grid(tmp_path, screen={"builder_optimization_level": 1, "front_max": 1}), REPO)
    s = setup(tmp_path)
    runner = Runner(grid, s, ["0", "1"], 1, lambda records: None)
    ran, asked = [], []
    monkeypatch.setattr(Runner, "launch", lambda self, job, gpu, recipe, profile: ran.append((job.chain, job.stage)))
    monkeypatch.setattr(Runner, "record_of", lambda self, job: fake_record(
        *next((r, p) for r, p in pairs if f"{r.name}.L{r.builder_optimization_level}.{p}" == job.chain), 1.0, 0.37))
    screen = [(r.replace(builder_optimization_level=1), p) for r in expand(grid) for p in ("b1",)]
    late = [(expand(grid)[2], "b1")]
    pairs = screen + late

    def then(records):
        asked.append(len(records))
        return late

    records, failures = runner.run(screen, ("engine", "bench", "accuracy"), None, lambda line: None, then)
    assert not failures and asked == [len(screen)] and len(records) == len(screen) + 1
    last_screen = max(i for i, (c, st) in enumerate(ran) if c.endswith(".L1.b1") and st == "accuracy")
    assert ran.index((f"{late[0][0].name}.L3.b1", "engine")) > last_screen


def test_a_build_only_run_builds_every_chain_and_publishes_no_row(tmp_path, monkeypatch):
    """`--stages engine` (a lease that only builds, handing its engines on): every point's engine job runs, nothing
    is timed, and a record without timings or mAP is no row of the table."""
    from tools.sweep import Runner

    grid = load_grid(write_grid(tmp_path), REPO)
    published = []
    runner = Runner(grid, setup(tmp_path), ["0"], 2, published.append)
    ran = []
    monkeypatch.setattr(Runner, "launch", lambda self, job, gpu, recipe, profile: ran.append((job.chain, job.stage)))
    monkeypatch.setattr(Runner, "record_of", lambda self, job: {
        k: v for k, v in fake_record(expand(grid)[0], "b1", 1.0, 0.37).items() if k not in ("bench", "accuracy")})
    pairs = [(r, p) for r in expand(grid) for p in ("b1", "b32")]
    records, failures = runner.run(pairs, ("engine",), None, lambda line: None)
    assert not failures and records == [] and published == []
    assert sorted(ran) == sorted((f"{r.name}.L{r.builder_optimization_level}.{p}", "engine") for r, p in pairs)


def test_report_profile_section_reads_the_committed_by_block_table(tmp_path):
    """REPORT.md's profile section is built from `make profile`'s by-block CSV of the throughput profile."""
    import csv
    import shutil

    from tools.core.layout import Layout
    from tools.core.sweep_table import Table
    from tools.report import profile_section

    src = REPO / "results/yolo11n/profile/b32-L3/by-block.csv"
    layout = Layout("yolo11n", tmp_path, tmp_path / "results")
    (layout.out / "profile" / "b32-L3").mkdir(parents=True)
    shutil.copy(src, layout.out / "profile" / "b32-L3" / "by-block.csv")
    rows = [{"config": "fp16", "precision": "fp16", "level": 3, "profile": p, "batch": b, "latency_ms_p50": 1.0,
             "throughput_ips": 1000.0 * b, "map50_95": 0.37} for p, b in (("b1", 1), ("b32", 32))]
    md = "\n".join(profile_section(layout, Table(rows, final_level=3)))
    total = next(r for r in csv.DictReader(open(src)) if r["block"] == "all")
    assert f"| int8-qdq | {float(total['speedup_int8-qdq']):.2f}x | {float(total['conv_speedup_int8-qdq']):.2f}x" in md
    assert f"| {float(total['conv_bound_speedup_int8-qdq']):.2f}x |" in md
    assert "profile/b32-L3/profile.md" in md
    assert profile_section(Layout("yolo11n", tmp_path, tmp_path / "none"), Table(rows, final_level=3)) == []


def test_every_committed_grid_expands_and_the_layer_proposal_names_single_nodes():
    """Each grid under recipes/grids loads; the per-layer latency-aware point excludes what the committed per-layer
    sensitivity proposed, each added regex matching exactly one node of the model."""
    import re

    import onnx

    for path in sorted((REPO / "recipes/grids").glob("*.yaml")):
        assert expand(load_grid(path, REPO)), path.name
    points = {p.name: p for p in expand(load_grid(REPO / "recipes/grids/yolo11n-layers.yaml", REPO))}
    proposal = json.loads((REPO / "results/yolo11n/sensitivity-layers-latency.json").read_text())["proposal"]
    point = points["qdq-x-layer-latency-aware"]
    assert list(point.nodes_to_exclude) == proposal["nodes_to_exclude"]
    names = [n.name for n in onnx.load(str(REPO / "models/yolo11/yolo11n.onnx")).graph.node]
    added = proposal["nodes_to_exclude"][len(points["int8-dfl-mse"].nodes_to_exclude):]
    assert added and all(sum(bool(re.match(rx, n)) for n in names) == 1 for rx in added)


def test_report_shows_the_committed_end_to_end_table_and_predictions(tmp_path):
    from tools.core.layout import Layout
    from tools.report import end_to_end_section

    layout = Layout("yolo11n", tmp_path, tmp_path / "results", False)
    assert end_to_end_section(layout) == []  # no make e2e run: no section
    layout.out.mkdir(parents=True)
    layout.e2e("md").write_text("# End to end: yolo11n\n\n| engine | total |\n|---|---|\n| fp16 | 7.9 |\n")
    (layout.out / "predict" / "fp16").mkdir(parents=True)
    (layout.out / "predict" / "fp16" / "a.jpg").write_bytes(b"")
    md = "\n".join(end_to_end_section(layout))
    assert "| fp16 | 7.9 |" in md and "# End to end: yolo11n" not in md
    assert "![fp16 a](predict/fp16/a.jpg)" in md


def test_build_servers_outlive_the_sweep_under_build_servers_dir(tmp_path):
    """--build-servers DIR: the first sweep starts its GPU's server in DIR and leaves it running; the next sweep
    builds on that same server (its build counter goes on), a socket file left by a dead server is replaced by a
    fresh server, `python -m tools.trtexec_py --stop` ends one, and without DIR the sweep stops its own server."""
    from tools.sweep import Runner
    from tools.trtexec_py import build_on_server, server_listening
    from tools.trtexec_py import main as trtexec_py

    stand_in = tmp_path / "trtexec_py_stand_in.py"  # a build server whose builder stands in for TensorRT's
    stand_in.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tools.trtexec_py import BuildServer\n"
                        "BuildServer(lambda opts, out: b'PLAN', 'stand-in').serve(sys.argv[2])\n")
    grid = load_grid(write_grid(tmp_path), REPO)
    s = setup(tmp_path, trtexec=(sys.executable, str(stand_in)))
    servers = Path(tempfile.mkdtemp(dir="/tmp")) / "s"  # made by the sweep; AF_UNIX paths must stay short
    sock = str(servers / "gpu0.sock")

    def sweep_building_once(server_dir):
        """What one sweep does with its servers, reduced to one build; the server's answer, as the build log has it."""
        runner = Runner(grid, s, ["0"], 1, lambda records: None, server_dir=server_dir)
        with runner.build_servers(), contextlib.redirect_stdout(io.StringIO()) as out:
            assert server_listening(runner.servers["0"])
            assert build_on_server(runner.servers["0"], ["--onnx=m.onnx", f"--saveEngine={tmp_path / 'e.engine'}",
                                                         "--skipInference"]) == 0
        return runner.servers, out.getvalue()

    def gone(address):
        deadline = time.monotonic() + 10
        while server_listening(address) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not server_listening(address)

    assert "build 1 of this process" in sweep_building_once(str(servers))[1]
    assert server_listening(sock)  # left running for the next sweep
    assert "build 2 of this process" in sweep_building_once(str(servers))[1]
    trtexec_py(["--stop", sock])
    assert gone(sock)

    dead = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on, as a killed server leaves it
    dead.bind(sock)
    dead.close()
    assert "build 1 of this process" in sweep_building_once(str(servers))[1]
    trtexec_py(["--stop", sock])
    assert gone(sock)
    with pytest.raises(UserError, match="no build server answers at .*gpu0.sock"):
        trtexec_py(["--stop", sock])

    own = Runner(grid, s, ["0"], 1, lambda records: None)
    with own.build_servers():
        mine = own.servers["0"]
        assert server_listening(mine) and not mine.startswith(str(servers))
    assert gone(mine)

    per_gpu = {"0": sock, "1": str(servers / "gpu1.sock")}  # several GPUs: a server each, all left running
    two = Runner(grid, s, list(per_gpu), 1, lambda records: None, server_dir=str(servers))
    with two.build_servers():
        assert two.servers == per_gpu
    for address in per_gpu.values():
        assert server_listening(address)
        trtexec_py(["--stop", address])
        assert gone(address)
