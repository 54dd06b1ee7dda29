"""Grid expansion, cache/resume of finished stages, and the report's selection rule."""
import json
import time

import pytest
import yaml
from conftest import CALIB, MINI, REPO

import tools.pipeline as pipeline
from tools.common import UserError
from tools.recipe import digest, load
from tools.report import select
from tools.sweep import earlier_runs, expand, load_grid, run_seconds, run_sweep, stage_seconds


def write_grid(tmp_path, design="one-at-a-time", extra_axes=None):
    grid = {"model": "yolo11n", "base": "recipes/yolo11n/int8-qdq.yaml", "design": design,
            "references": ["recipes/yolo11n/fp16.yaml", "recipes/yolo11n/int8-qdq.yaml"],
            "axes": {"calibration_method": ["entropy", "max"], "calib_images": [64, 400],
                     "nodes_to_exclude": {"default": ["/model\\.10/.*attn.*"], "none": []},
                     **(extra_axes or {})}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_one_at_a_time_expansion(tmp_path):
    points = expand(load_grid(write_grid(tmp_path), REPO))
    names = [p.name for p in points]
    # references, then one change per non-base axis value; the base coincides with int8-qdq and is not repeated
    assert names == ["fp16", "int8-qdq", "qdq-max-n400-x-default", "qdq-entropy-n64-x-default",
                     "qdq-entropy-n400-x-none"]
    assert len({digest(p.settings()) for p in points}) == len(points)
    assert points[3].calib_images == 64 and points[3].calibration_method == "entropy"


def test_product_expansion(tmp_path):
    points = expand(load_grid(write_grid(tmp_path, "product"), REPO))
    assert len(points) == 2 + 2 * 2 * 2 - 1  # the product point equal to int8-qdq collapses into it


def test_default_grid_expands(tmp_path):
    points = expand(load_grid(REPO / "recipes/grids/yolo11n.yaml", REPO))
    assert {"fp16", "int8-qdq", "int8-implicit", "int8-ultralytics"} <= {p.name for p in points}
    assert any(p.builder_optimization_level == 1 for p in points)


def test_grid_rejects_unknown_axis(tmp_path):
    with pytest.raises(UserError, match="not a recipe key"):
        load_grid(write_grid(tmp_path, extra_axes={"learning_rate": [1]}), REPO)


def test_grid_bench_section_is_checked(tmp_path):
    assert load_grid(REPO / "recipes/grids/yolo11n.yaml", REPO).bench["cuda_graphs"] == (True,)
    path = write_grid(tmp_path)
    grid = yaml.safe_load(path.read_text())
    grid["bench"] = {"duraton_s": 1}
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    with pytest.raises(UserError, match="duraton_s"):
        load_grid(path, REPO)


def test_resume_skips_finished_stages(tmp_path, monkeypatch):
    """A point whose record holds a stage's result never reruns that stage; missing stages run once."""
    recipe = load(REPO / "recipes/yolo11n/fp16.yaml")
    setup = pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, root=REPO, trt_version="8.6.1")
    monkeypatch.setattr(pipeline, "gpu_name", lambda: "Test GPU")
    calls = []

    def fake(stage):
        def run(point, run_setup):
            calls.append(stage)
            point.record[pipeline.STAGE_KEYS[stage]] = (
                [{"batch": b, "cuda_graph": g} for b, g in pipeline.missing_timings(point, run_setup)]
                if stage == "bench" else {"engine": "x", "stage": stage})
            if stage == "accuracy" and run_setup.compare_images:
                point.record["compare"] = {"passed": True}
        return run

    monkeypatch.setattr(pipeline, "STAGE_FUNCS", {s: fake(s) for s in ("engine", "bench", "accuracy")})
    monkeypatch.setattr(pipeline, "save", lambda point: saved.__setitem__(point.stem, json.loads(json.dumps(point.record))))
    saved = {}
    point = pipeline.make_point(recipe, setup)
    assert not point.record_path.exists()
    monkeypatch.setattr(pipeline, "make_point", lambda r, s: point)
    pipeline.run_recipe(recipe, setup, ("engine", "bench"))
    assert calls == ["engine", "bench"]
    pipeline.run_recipe(recipe, setup, ("engine", "bench", "accuracy"))  # resumed: only accuracy is new
    assert calls == ["engine", "bench", "accuracy"]
    pipeline.run_recipe(recipe, setup, pipeline.STAGE_SETS["gpu"])
    assert calls == ["engine", "bench", "accuracy"]


def test_point_key_changes_with_gpu_and_tensorrt(monkeypatch):
    recipe = load(REPO / "recipes/yolo11n/fp16.yaml")
    monkeypatch.setattr(pipeline, "gpu_name", lambda: "GPU A")
    a = pipeline.make_point(recipe, pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, trt_version="8.6.1"))
    b = pipeline.make_point(recipe, pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, trt_version="10.3"))
    monkeypatch.setattr(pipeline, "gpu_name", lambda: "GPU B")
    c = pipeline.make_point(recipe, pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, trt_version="8.6.1"))
    assert len({a.key, b.key, c.key}) == 3


def row(config, precision, batch, ms, ips, m):
    return {"config": config, "precision": precision, "batch": batch, "latency_ms_p50": ms,
            "latency_ms_p50_cuda_graph": None, "latency_ms_p99": ms, "throughput_ips": ips,
            "throughput_ips_cuda_graph": None, "map50_95": m, "map50": m}


def test_selection_rule():
    rows = [row("fp16", "fp16", 1, 1.00, 1000, 0.400), row("fp16", "fp16", 32, 5.0, 6000, 0.400),
            row("fast-bad", "int8-qdq", 1, 0.60, 1600, 0.390), row("fast-bad", "int8-qdq", 32, 3.0, 10000, 0.390),
            row("ok", "int8-qdq", 1, 0.80, 1250, 0.397), row("ok", "int8-qdq", 32, 4.5, 7000, 0.397),
            row("wide", "int8-implicit", 1, 0.85, 1200, 0.399), row("wide", "int8-implicit", 32, 4.0, 8000, 0.399)]
    choice = select(rows, budget=0.5)
    assert choice["latency"] == "ok"  # fast-bad is 1.0 point below FP16: out of budget
    assert choice["throughput"] == "wide"
    assert select(rows, budget=2.0)["latency"] == "fast-bad"
    none = select(rows, budget=0.0)
    assert none["latency"] is None and none["closest"] == "wide"  # the most accurate INT8, for the report


def test_stop_after_ends_between_points_and_resumes(tmp_path):
    """--stop-after stops before a new point, never inside one; the next run finishes the rest from the cache."""
    grid = load_grid(write_grid(tmp_path), REPO)
    setup = pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, root=REPO, trt_version="8.6.1")
    done = {}

    def runner(recipe, _setup, _stages, log):
        if recipe.name not in done:
            done[recipe.name] = {"name": recipe.name, "build": {}, "bench": [], "accuracy": {},
                                 "stage_seconds": {"engine": 2.0, "bench": 1.0}}
        return done[recipe.name]

    records, _ = run_sweep(grid, setup, runner=runner, stop_after=0)
    assert len(records) == 1 and len(done) == 1  # the first point starts, the deadline stops the second
    records, failures = run_sweep(grid, setup, runner=runner)
    assert len(records) == len(expand(grid)) == len(done) and not failures
    assert stage_seconds(records) == {"engine": 2.0 * len(done), "bench": 1.0 * len(done), "total": 3.0 * len(done)}


def timeline_sweep(tmp_path, overlap):
    """Run a sweep whose stages sleep and log when they ran: [(point, stage, start, end)]."""
    grid = load_grid(write_grid(tmp_path), REPO)
    setup = pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, root=REPO, trt_version="8.6.1")
    spans, records = [], {}

    def runner(recipe, _setup, stages, log):
        rec = records.setdefault(recipe.name, {"name": recipe.name})
        for stage in stages:
            start = time.monotonic()
            time.sleep(0.3 if stage == "accuracy" else 0.05)
            rec[pipeline.STAGE_KEYS[stage]] = {}
            spans.append((recipe.name, stage, start, time.monotonic()))
        return rec

    done, failures = run_sweep(grid, setup, ("engine", "bench", "accuracy"), runner=runner, overlap=overlap)
    assert not failures and [r["name"] for r in done] == [p.name for p in expand(grid)]
    return spans


def test_accuracy_overlaps_the_next_build_but_never_a_bench(tmp_path):
    spans = timeline_sweep(tmp_path, overlap=True)
    when = {(name, stage): (start, end) for name, stage, start, end in spans}
    names = list(dict.fromkeys(name for name, *_ in spans))
    for prev, nxt in zip(names, names[1:]):
        accuracy, engine, bench = when[(prev, "accuracy")], when[(nxt, "engine")], when[(nxt, "bench")]
        assert engine[0] < accuracy[1]  # the next engine built while the accuracy ran
        assert bench[0] >= accuracy[1]  # and its timing waited for the accuracy to finish
    for _, _, start, end in (s for s in spans if s[1] == "bench"):  # no stage of any point overlaps a bench
        assert not [s for s in spans if s[1] != "bench" and s[2] < end and s[3] > start]


def test_serial_sweep_runs_one_stage_at_a_time(tmp_path):
    spans = sorted(timeline_sweep(tmp_path, overlap=False), key=lambda s: s[2])
    assert all(a[3] <= b[2] for a, b in zip(spans, spans[1:]))


def test_wall_time_adds_up_over_resumed_runs(tmp_path):
    table = tmp_path / "sweep.json"
    assert earlier_runs(table, "g.yaml") == ([], False)
    table.write_text(json.dumps({"grid": "g.yaml", "complete": False, "run_seconds": [400, 380]}))
    assert earlier_runs(table, "g.yaml") == ([400, 380], False)
    assert earlier_runs(table, "other.yaml") == ([], False)
    assert run_seconds([400, 380], False, 90, measured=True) == [400, 380, 90]  # resumed: the runs add up
    assert run_seconds([400, 380, 90], True, 5, measured=False) == [400, 380, 90]  # a cache-only rerun keeps them
    assert run_seconds([400, 380, 90], True, 700, measured=True) == [700]  # a new measurement starts afresh


def test_bench_runs_only_missing_timings(tmp_path, monkeypatch):
    """A reference timed by a sweep (CUDA graphs only) gets only its plain runs added by the full protocol."""
    import tools.bench

    recipe = load(REPO / "recipes/yolo11n/fp16.yaml")
    point = pipeline.Point(recipe, None, MINI, "k", tmp_path / "rec.json", {"build": {"engine": "engines/x.engine"}})
    runs = []

    def fake_bench(engine, trtexec, prefix, batches, imgsz, graphs, warmup_ms, duration_s):
        runs.extend((b, g) for b in batches for g in graphs)
        return [{"batch": b, "cuda_graph": g, "latency_ms_p50": 1.0, "log": str(REPO / "logs" / "x.log")}
                for b in batches for g in graphs]

    monkeypatch.setattr(tools.bench, "bench", fake_bench)
    sweep_setup = pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, root=REPO, cuda_graphs=(True,))
    full_setup = pipeline.Setup(calib_dir=CALIB, eval_dir=MINI, root=REPO)
    pipeline.stage_bench(point, sweep_setup)
    assert runs == [(1, True), (8, True), (32, True)] and pipeline.stage_done("bench", point, sweep_setup)
    assert not pipeline.stage_done("bench", point, full_setup)
    pipeline.stage_bench(point, full_setup)
    assert runs[3:] == [(1, False), (8, False), (32, False)]
    assert len(point.record["bench"]) == 6 and pipeline.stage_done("bench", point, full_setup)


def test_table_only_rebuilds_from_newest_records(tmp_path):
    """--table-only: one row set per point from its newest complete record; the run's own fields are kept."""
    from tools.sweep import rebuild_table

    grid = load_grid(write_grid(tmp_path), REPO)
    points = tmp_path / "yolo11n" / "points"
    points.mkdir(parents=True)
    for name in ("fp16", "int8-qdq"):
        src = next((REPO / "results/yolo11n/points").glob(f"{name}.*.json"))
        (points / src.name).write_text(src.read_text())
    stale = json.loads(next(points.glob("fp16.*.json")).read_text())
    stale.update(key="old", accuracy={**stale["accuracy"], "map50_95": 0.1}, measured_utc={"accuracy": "2000-01-01"})
    (points / "fp16.old.json").write_text(json.dumps(stale))
    (tmp_path / "yolo11n" / "sweep.json").write_text(json.dumps({"note": "kept", "rows": []}))
    rebuild_table(grid, tmp_path / "yolo11n")
    out = json.loads((tmp_path / "yolo11n" / "sweep.json").read_text())
    assert out["note"] == "kept" and out["points"] == 2 and out["points_planned"] == 5 and not out["complete"]
    assert {r["config"] for r in out["rows"]} == {"fp16", "int8-qdq"} and len(out["rows"]) == 6
    assert all(r["map50_95"] > 0.3 for r in out["rows"])  # the stale fp16 record lost to the newer one


def test_off_axis_values_are_named_after_their_recipe():
    from tools.sweep import label_of

    axis = {"x-default": ["/model\\.10/.*attn.*"], "x-none": []}
    assert label_of("nodes_to_exclude", ("/model\\.10/.*attn.*",), axis, owner="int8-qdq") == "x-default"
    assert label_of("nodes_to_exclude", (".*/dfl/",), axis, owner="int8-ultralytics") == "x-as-int8-ultralytics"
    assert label_of("nodes_to_exclude", (".*/dfl/",), axis).startswith("x-")  # point names: a digest
