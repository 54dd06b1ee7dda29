"""Sweep: expand a grid into recipes and run each end to end (quantize -> engine -> bench -> accuracy).

Every point is keyed by a hash of its inputs and settings (see tools.pipeline), so a sweep killed half-way and
started again redoes no finished work. Writes results/<model>/sweep.{json,csv}: one row per configuration and
batch size. Points whose settings coincide (the base and a reference, say) run once. A point's accuracy runs while
the next engine builds (`--serial`: strictly one stage after another); timings always run alone.
Usage: python -m tools.sweep recipes/grids/yolo11n.yaml [--stages cpu|gpu|all] [pipeline flags]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import time
from pathlib import Path

import yaml

from tools.common import REPO, UserError, run_main, write_json, write_text
from tools.pipeline import (CPU_STAGES, STAGES, add_setup_args, has_all_stages, have_tensorrt, parse_stages,
                            run_recipe, setup_from_args)
from tools.recipe import Recipe, digest, load
from tools.summary import engine_rows
from tools.trtlog import to_csv

BENCH_KEYS = ("cuda_graphs", "duration_s", "warmup_ms", "compare_images")  # Setup fields a grid may override
SHORT = {"calibration_method": "", "calib_images": "n", "builder_optimization_level": "L", "nodes_to_exclude": "x-"}


@dataclasses.dataclass(frozen=True)
class Grid:
    model: str
    base: Recipe
    design: str
    references: tuple[Recipe, ...]
    axes: dict  # key -> {label: value}
    bench: dict


def axis_values(key: str, values, root: Path) -> dict:
    """An axis as {label: value}; lists get labels from their values, mappings name their values."""
    if isinstance(values, list):
        return {f"{SHORT.get(key, key + '=')}{v}": v for v in values}
    if not isinstance(values, dict):
        raise UserError(f"grid axis {key!r}: give a list of values or a mapping of label: value")
    out = {}
    for label, v in values.items():
        if isinstance(v, dict) and "from" in v:
            v = proposal(root / v["from"])
            if v is None:
                continue
        out[f"{SHORT.get(key, key + '=')}{label}"] = v
    return out


def proposal(path: Path):
    """The exclusion set `make sensitivity` proposed, or None (with a note) when it has not run."""
    if not path.is_file():
        print(f"note: {path} does not exist yet (run `make sensitivity`); its axis value is left out")
        return None
    return json.loads(path.read_text())["proposal"]["nodes_to_exclude"]


def load_grid(path, root: Path = REPO) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such grid; see recipes/grids/ for examples")
    g = yaml.safe_load(path.read_text()) or {}
    unknown = set(g) - {"model", "base", "design", "references", "axes", "bench"}
    if unknown:
        raise UserError(f"{path}: unknown grid key(s) {sorted(unknown)}; valid: model, base, design, references, axes, bench")
    if g.get("design", "one-at-a-time") not in ("one-at-a-time", "product"):
        raise UserError(f"{path}: design must be one-at-a-time or product")
    bench = dict(g.get("bench") or {})
    if set(bench) - set(BENCH_KEYS):
        raise UserError(f"{path}: unknown bench key(s) {sorted(set(bench) - set(BENCH_KEYS))}; valid: {', '.join(BENCH_KEYS)}")
    if "cuda_graphs" in bench:
        bench["cuda_graphs"] = tuple(bench["cuda_graphs"])
    base = load(root / g["base"])
    axes = {}
    for key, values in (g.get("axes") or {}).items():
        if key not in {f.name for f in dataclasses.fields(Recipe)}:
            raise UserError(f"{path}: axis {key!r} is not a recipe key")
        axes[key] = axis_values(key, values, root)
    return Grid(g.get("model", base.model), base, g.get("design", "one-at-a-time"),
                tuple(load(root / r) for r in g.get("references", [])), axes, bench)


def label_of(key: str, value, axis: dict, owner: str | None = None) -> str:
    """The axis label of `value`; a value off the axis (a reference's own setting) is named after `owner`, the
    recipe it comes from, or else by a digest."""
    for label, v in axis.items():
        if v == value or (isinstance(v, list) and tuple(v) == value):
            return label
    return f"{SHORT.get(key, key + '=')}{f'as-{owner}' if owner else digest(value)[:6]}"


def point_name(grid: Grid, recipe: Recipe) -> str:
    parts = [label_of(k, getattr(recipe, k), grid.axes[k]) for k in grid.axes]
    return "qdq-" + "-".join(parts) if recipe.precision == "int8-qdq" else recipe.precision + "-" + "-".join(parts)


def expand(grid: Grid) -> list[Recipe]:
    """References first, then the grid's points; points with identical settings collapse to the first."""
    combos = []
    if grid.design == "product":
        keys = list(grid.axes)
        for values in itertools.product(*(grid.axes[k].values() for k in keys)):
            combos.append(dict(zip(keys, values)))
    else:
        combos.append({})
        for key, axis in grid.axes.items():
            for value in axis.values():
                normal = tuple(value) if isinstance(value, list) else value
                if normal != getattr(grid.base, key):
                    combos.append({key: value})
    points, seen = [], {}
    for ref in grid.references:
        seen.setdefault(digest(ref.settings()), ref.name)
        points.append(ref)
    for changes in combos:
        r = grid.base.replace(**changes)
        r = r.replace(name=point_name(grid, r), description=f"sweep point of {grid.base.name}: {changes or 'base'}")
        if digest(r.settings()) in seen:
            continue
        seen[digest(r.settings())] = r.name
        points.append(r)
    return points


def sweep_rows(records: list[dict], grid: Grid) -> list[dict]:
    rows = []
    for rec in records:
        recipe = rec["recipe"]
        meta = {"config": rec["name"], "precision": rec["precision"], "key": rec["key"],
                **{k: (label_of(k, tuple(recipe[k]) if isinstance(recipe[k], list) else recipe[k], grid.axes[k],
                                owner=rec["name"]) if rec["precision"] == "int8-qdq" else "") for k in grid.axes},
                "level": recipe["builder_optimization_level"], "gpu": rec["gpu"], "tensorrt": rec["trt_version"]}
        rows += [{**meta, **row} for row in engine_rows(rec)]
    return rows


def stage_seconds(records: list[dict]) -> dict:
    """GPU-stage seconds summed over the points, as each record logged them: the sweep's cost across resumed runs
    (`seconds` is only this invocation's wall time)."""
    total = {}
    for rec in records:
        for stage, s in rec.get("stage_seconds", {}).items():
            total[stage] = round(total.get(stage, 0) + s, 1)
    return {**total, "total": round(sum(total.values()), 1)}


def run_sweep(grid: Grid, setup, stages=STAGES, runner=run_recipe, only=None,
              publish=lambda records, failures, planned, complete: None,
              stop_after: float | None = None, overlap: bool = True) -> tuple[list[dict], dict]:
    """Run every point (or those whose name contains one of `only`; references always run, as the yardstick), all
    under the grid's timing protocol, so every ratio in the table compares like with like.
    `stop_after` (seconds): start no new point after that long, so a bounded job ends between points and the next
    run resumes from the cache instead of losing a half-built engine to a kill.
    `overlap`: a point's accuracy runs in a second thread while the next point's engine builds. Both are CPU work
    (TensorRT compiles kernels on the host; mAP is decoding, NMS and COCOeval around a fraction of a second of
    inference), and mAP does not depend on timing. Timings never overlap anything: a point's bench starts only
    once the previous point's accuracy has finished."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    refs = {r.name for r in grid.references}
    points = [p for p in expand(grid) if not only or p.name in refs or any(o in p.name for o in only)]
    records, failures = [], {}
    bench = dataclasses.replace(setup, **grid.bench)
    before_bench = tuple(s for s in stages if s not in ("bench", "accuracy"))
    timed = tuple(s for s in stages if s == "bench")
    last = tuple(s for s in stages if s == "accuracy")
    pending = []  # (name, future) of the accuracy still running, at most one
    t0 = time.monotonic()

    def fail(name: str, error: UserError) -> None:
        failures[name] = str(error)
        bar.write(f"  {name}: FAILED: {error}")

    def finish(name: str, result) -> None:
        """Book a point's outcome (`result` returns its record or raises): the record once complete, or the error."""
        try:
            rec = result()
        except UserError as e:
            fail(name, e)
            return
        if has_all_stages(rec):
            records.append(rec)
            publish(records, failures, len(points), False)

    def settle() -> None:
        while pending:
            name, future = pending.pop()
            finish(name, future.result)

    with ThreadPoolExecutor(1) as background, tqdm(points, desc="sweep", unit="point") as bar:
        for i, recipe in enumerate(bar):
            if stop_after is not None and i and time.monotonic() - t0 > stop_after:  # one point always runs
                bar.write(f"stopped after {time.monotonic() - t0:.0f} s (--stop-after {stop_after:g}): "
                          f"{len(points) - i} point(s) left; run the same command again to resume")
                break
            bar.set_postfix_str(recipe.name)
            run = functools.partial(runner, recipe, bench, log=bar.write)
            try:
                rec = run(before_bench) if before_bench else None
                settle()  # the GPU is quiet from here on: nothing else runs while this point is timed
                rec = run(timed) if timed else rec
            except UserError as e:
                fail(recipe.name, e)
                continue
            if last and overlap:
                pending.append((recipe.name, background.submit(run, last)))
            else:
                finish(recipe.name, functools.partial(run, last) if last else lambda: rec)
        settle()
    publish(records, failures, len(points), not failures and len(records) == len(points))
    return records, failures


def earlier_runs(table: Path, grid_path: str) -> tuple[list[int], bool]:
    """Wall seconds of the runs behind the existing table of this grid, and whether they finished it."""
    if not table.is_file():
        return [], False
    old = json.loads(table.read_text())
    if old.get("grid") != grid_path:
        return [], False
    return list(old.get("run_seconds", [old["seconds"]] if "seconds" in old else [])), bool(old.get("complete"))


def run_seconds(earlier: list[int], finished: bool, this_run: int, measured: bool) -> list[int]:
    """The runs a table's wall time sums: a resumed run adds to the unfinished table's runs; after a finished table,
    a run that measures anything starts the count afresh, and one that only reads the cache changes nothing."""
    if not finished:
        return earlier + [this_run]
    return [this_run] if measured else earlier


def write_table(out: Path, grid: Grid, records: list[dict], fields: dict) -> None:
    """results/<model>/sweep.json (`fields`, the point count, GPU-stage seconds and the rows) and sweep.csv."""
    rows = sweep_rows(records, grid)
    write_json(out / "sweep.json", {**fields, "points": len(records), "stage_seconds": stage_seconds(records),
                                    "rows": rows})
    write_text(out / "sweep.csv", to_csv(rows))


def rebuild_table(grid: Grid, out: Path) -> None:
    """Rewrite the sweep table from the records on disk (after a change to the table's columns, say); the run's own
    fields (wall time, notes) are kept. Takes each point's newest complete record."""
    planned = expand(grid)
    records = []
    for recipe in planned:
        found = [json.loads(p.read_text()) for p in sorted((out / "points").glob(f"{recipe.name}.*.json"))]
        found = [r for r in found if has_all_stages(r)]
        if found:
            records.append(max(found, key=lambda r: r.get("measured_utc", {}).get("accuracy", "")))
    if not records:
        raise UserError(f"{out / 'points'}: no complete record of any point of this grid; run the sweep first")
    old = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
    write_table(out, grid, records, {**old, "points_planned": len(planned), "complete": len(records) == len(planned)})
    print(f"rebuilt {out / 'sweep.csv'} from {len(records)} records")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__)
    ap.add_argument("grid")
    ap.add_argument("--stages", default="calib,quantize,engine,bench,accuracy",
                    help="comma-separated stages (default: all but onnxrt), or cpu / gpu")
    ap.add_argument("--list", action="store_true", help="print the expanded points and exit")
    ap.add_argument("--only", help="comma-separated parts of point names to run (references always run)")
    ap.add_argument("--references", help="comma-separated reference names to keep (default: all)")
    ap.add_argument("--table-only", action="store_true",
                    help="rebuild sweep.json/csv from the points' records (newest per point), running nothing")
    ap.add_argument("--stop-after", type=float, metavar="SECONDS",
                    help="start no new point after this many seconds; the next run resumes (for time-limited jobs)")
    ap.add_argument("--serial", action="store_true",
                    help="run each point's stages strictly one after another (default: a point's accuracy runs "
                         "while the next engine builds)")
    add_setup_args(ap)
    args = ap.parse_args(argv)
    grid = load_grid(args.grid)
    if args.references:
        keep = args.references.split(",")
        grid = dataclasses.replace(grid, references=tuple(r for r in grid.references if r.name in keep))
    if args.list:
        for r in expand(grid):
            print(f"{r.name:40s} {digest(r.settings())}")
        return
    out = REPO / "results" / grid.model
    if args.table_only:
        rebuild_table(grid, out)
        return
    stages = parse_stages(args.stages)
    if set(stages) - set(CPU_STAGES) and not have_tensorrt():
        print("TensorRT is not installed here: running the CPU stages only (quantize every point)")
        stages = tuple(s for s in stages if s in CPU_STAGES)
    t0 = time.perf_counter()
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    earlier, finished = earlier_runs(out / "sweep.json", str(args.grid))

    def publish(records, failures, planned, complete):
        """Rewrite the sweep table after every point, so an interrupted sweep still leaves what it measured."""
        if not records:
            return
        measured = any(t >= started_utc for r in records for t in r.get("measured_utc", {}).values())
        runs = run_seconds(earlier, finished, round(time.perf_counter() - t0), measured)
        write_table(out, grid, records, {"grid": str(args.grid), "design": grid.design, "points_planned": planned,
                                         "complete": complete, "failures": failures, "overlap": not args.serial,
                                         "run_seconds": runs, "seconds": sum(runs)})

    records, failures = run_sweep(grid, setup_from_args(args), stages,
                                  only=args.only.split(",") if args.only else None, publish=publish,
                                  stop_after=args.stop_after, overlap=not args.serial)
    if records:
        print(f"wrote {out / 'sweep.csv'}: {len(records)} configurations")
    for name, err in failures.items():
        print(f"failed: {name}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
