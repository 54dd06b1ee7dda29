"""Sweep: expand a grid into recipes and run every point end to end, in parallel over the machine's GPUs.

A point is one recipe and one deployment profile (one engine); its GPU stages run as a chain of jobs, each a
`python -m tools.pipeline STAGE RECIPE --profiles P ...` process pinned to one GPU (CUDA_VISIBLE_DEVICES), scheduled
by tools.scheduler: timings alone on their GPU, builds and accuracy side by side (JOBS_PER_GPU at a time).
With `screen: {builder_optimization_level: L}` in the grid, FP16, the base and every point are first measured at the
cheaper level L; the Pareto front is then measured again at the recipes' own level, beside FP16, the base and the
other references, in the same run, and the report states how well the screening level ranked them.
Every point is keyed by its inputs (tools/core/), so a sweep killed half-way and started again redoes no finished
work; points can also be sharded over machines (`--shard 1/2`, `--shard 2/2`) and their records folders merged
(`--table-only` rebuilds the table from whatever records are there).
Writes <results>/<model>/sweep.{json,csv}: one row per configuration, level, profile and batch; one grid's table per
results folder (a sweep of another grid there is refused rather than replacing it).
Usage: python -m tools.sweep recipes/grids/yolo11n.yaml [--stages cpu|gpu|all] [pipeline flags]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from tools.core.cli import add_model, non_negative_number, positive_int
from tools.core.errors import UserError, run_main
from tools.core.files import REPO, digest, to_csv
from tools.core.grid import Grid, Screen, expand, load_grid
from tools.core.layout import Layout
from tools.core.recipe import Recipe, dump
from tools.core.record import engine_records, has_all_stages, read_json
from tools.core.setup import Setup, add_setup_args, setup_from_args, setup_to_args
from tools.core.sweep_table import pareto, stage_seconds, sweep_rows
from tools.pipeline import STAGES, have_tensorrt, parse_stages, run_recipe
from tools.scheduler import Job, run_chains
from tools.trtexec_py import server_listening, stop_server

# settings that change only the quantization scales, not the layers TensorRT times (its timing cache keys a layer by
# type, shapes, precision and formats, not by weights or scales)
SCALES_ONLY = {"calib_images", "calib_seed", "calibration_method", "calibration_percentile", "calibration_eps",
               "implicit_calibrator"}
EXCLUSIVE = {"bench", "layers"}  # stages that measure the GPU: nothing else may run on it meanwhile


# ----------------------------------------------------------------------------------------------------------------
# Result table
def write_table(layout: Layout, grid: Grid, records: list[dict], fields: dict) -> None:
    rows = sweep_rows(records, grid)
    layout.write_json(layout.sweep_json, {**fields, "points": len(records),
                                                  "stage_seconds": stage_seconds(records), "rows": rows})
    layout.write_text(layout.sweep_csv, to_csv(rows))


def run_seconds(earlier: list[int], finished: bool, this_run: int, measured: bool) -> list[int]:
    """The runs a table's wall time sums: a resumed run adds to the unfinished table's runs; after a finished table,
    a run that measures anything starts the count afresh, and one that only reads the cache changes nothing."""
    if not finished:
        return earlier + [this_run]
    return [this_run] if measured else earlier


def earlier_runs(old: dict) -> tuple[list[int], bool]:
    """Wall seconds of the runs behind this grid's existing table (this_grids_table), and whether they finished it."""
    return list(old.get("run_seconds", [])), bool(old.get("complete"))


def same_grid(a: str, b: str) -> bool:
    """Two spellings of one grid file (./recipes/... and recipes/..., or absolute) are one grid; tables record the path
    as given, relative to the repo, where make runs."""
    return (REPO / a).resolve() == (REPO / b).resolve()


def this_grids_table(table: Path, grid_path: str) -> dict:
    """The results folder's table ({} where there is none). One table per model in a results folder: a sweep of another
    grid there would replace that grid's table (and the run's fields only it holds), so it is refused in one line
    rather than lost."""
    old = read_json(table, "sweep table") if table.is_file() else {}
    if old.get("grid") is not None and not same_grid(old["grid"], grid_path):
        raise UserError(f"{table}: the table of {old['grid']}; a sweep of {grid_path} would replace it: give this "
                        f"grid its own results folder (RESULTS=DIR, --results DIR) or move {table.parent}/sweep.* away "
                        f"first")
    return old


# ----------------------------------------------------------------------------------------------------------------
# Running
def screened(recipe: Recipe, screen: Screen | None) -> Recipe:
    return recipe if screen is None else recipe.replace(builder_optimization_level=screen.builder_optimization_level)


def front(rows: list[dict], limit: int) -> list[str]:
    """Configurations on the Pareto front of mAP against speed in any profile (latency at its smallest batch,
    throughput at its largest), fastest first, at most `limit` besides FP16."""
    chosen = []
    for profile in sorted({r["profile"] for r in rows}):
        at = [r for r in rows if r["profile"] == profile]
        for batch, faster in ((min(r["batch"] for r in at), "latency"), (max(r["batch"] for r in at), "throughput")):
            pts = {r["config"]: (r["latency_ms_p50"] if faster == "latency" else -r["throughput_ips"], r["map50_95"])
                   for r in at if r["batch"] == batch}
            chosen += [c for c in pareto(pts) if c not in chosen]
    non_fp16 = [c for c in chosen if not c.startswith("fp16")]
    return non_fp16[:limit]


def job_command(recipe_file: Path, stage: str, profile: str, setup: Setup) -> list[str]:
    return [sys.executable, "-m", "tools.pipeline", stage, str(recipe_file), "--profiles", profile,
            *setup_to_args(setup)]


class Runner:
    """Runs points' GPU stages as pipeline processes pinned to the GPUs, and keeps the table current after every
    finished point."""

    def __init__(self, grid: Grid, setup: Setup, gpus: list[str], jobs_per_gpu: int, publish, layers=(),
                 server_dir: str | None = None):
        self.grid, self.setup, self.gpus, self.jobs_per_gpu, self.publish = grid, setup, gpus, jobs_per_gpu, publish
        self.layers = set(layers)  # recipes whose final-level engines also get a per-layer profile
        self.server_dir = server_dir  # build servers that outlive the sweep (--build-servers), else the sweep's own
        self.layout = setup.layout(grid.model)
        self.servers = {}  # GPU -> socket of its trtexec_py build server

    @contextlib.contextmanager
    def build_servers(self):
        """With the fallback trtexec, one build server per GPU keeps TensorRT's timing cache in memory across that
        GPU's builds (tools.trtexec_py.serve); NVIDIA's trtexec reuses --timingCacheFile instead. The sweep's own
        servers end with it; under --build-servers DIR a server already listening at DIR/gpuN.sock is used and a
        missing one is started there, and both are left running, so the next sweep given DIR builds on warm caches."""
        if not any("trtexec_py" in part for part in self.setup.trtexec):
            yield
            return
        starting = []
        own = [] if self.server_dir else starting  # the servers this sweep stops when it ends
        with tempfile.TemporaryDirectory(prefix="trt-build-") as tmp:
            try:
                if self.server_dir:
                    os.makedirs(self.server_dir, exist_ok=True)
                for gpu in self.gpus:
                    sock = os.path.join(self.server_dir or tmp, f"gpu{gpu}.sock")
                    self.servers[gpu] = sock
                    if self.server_dir and server_listening(sock):
                        continue
                    if os.path.exists(sock):  # left by a server that died: a new one cannot listen over it
                        os.unlink(sock)
                    log = self.layout.logs / "sweep" / f"build-server-gpu{gpu}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    proc = subprocess.Popen([*self.setup.trtexec, "--serve", sock], cwd=REPO, stdout=open(log, "a"),
                                            stderr=subprocess.STDOUT, start_new_session=bool(self.server_dir),
                                            env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})
                    starting.append((sock, proc))
                for sock, proc in starting:  # builds sent before a server listens would run beside it instead
                    deadline = time.monotonic() + 120
                    while not os.path.exists(sock) and proc.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.2)
                yield
            finally:
                self.servers = {}
                for sock, proc in own:
                    try:
                        stop_server(sock)
                        proc.wait(timeout=30)
                    except (OSError, subprocess.TimeoutExpired):
                        proc.kill()

    def recipe_file(self, recipe: Recipe) -> Path:
        """Sweep points are recipes too: written out, so every job (and a user rerunning it) reads a recipe file."""
        path = self.layout.out / "sweep" / "recipes" / f"{recipe.name}.L{recipe.builder_optimization_level}.yaml"
        text = f"# generated by tools.sweep from {self.grid.path}\n" + dump(recipe)
        if not path.is_file() or path.read_text() != text:
            self.layout.write_text(path, text)
        return path

    def launch(self, job: Job, gpu: str, recipe: Recipe, profile: str) -> None:
        cmd = job_command(self.recipe_file(recipe), job.stage, profile, job_setup(self.grid, self.setup, recipe))
        log = self.layout.logs / "sweep" / f"{job.chain}.{job.stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
        if gpu in self.servers:
            env["TRTEXEC_PY_SERVER"] = self.servers[gpu]
        with open(log, "w") as out:
            out.write(f"# CUDA_VISIBLE_DEVICES={gpu} {' '.join(cmd)}\n")
            out.flush()
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
        if rc != 0:
            tail = [line for line in log.read_text().splitlines() if line.startswith("error:")]
            raise UserError(tail[-1].removeprefix("error: ") if tail else f"{job.stage} failed (exit {rc}); see {log}")

    def record_of(self, job: Job) -> dict | None:
        """The record the job's pipeline process wrote (it prints `record: PATH`; the key is its business)."""
        log = self.layout.logs / "sweep" / f"{job.chain}.{job.stage}.log"
        paths = [line.split("record: ", 1)[1] for line in log.read_text().splitlines() if line.startswith("record: ")]
        return read_json(paths[-1]) if paths else None

    def chain(self, recipe: Recipe, profile: str, stages) -> list[Job]:
        name = f"{recipe.name}.L{recipe.builder_optimization_level}.{profile}"
        layers = {"model": recipe.model,
                  **{k: v for k, v in recipe.engine_settings(profile).items() if k not in SCALES_ONLY}}
        affinity = digest(layers)  # engines with the same layers: a GPU's build server times them once
        final = self.setup.adapt(self.grid.base).builder_optimization_level
        mine = stages + (("layers",) if recipe.name in self.layers and
                         recipe.builder_optimization_level == final else ())
        return [Job(name, s, s in EXCLUSIVE, affinity if s == "engine" else "", s == "accuracy") for s in mine]

    def run(self, points: list[tuple[Recipe, str]], stages, stop_after, log, then=None, gate=None
            ) -> tuple[list[dict], dict]:
        """Run `stages` of every (recipe, profile); `then(records)` is called with the records of the `gate` points
        (default: all of them) once those are done, and returns more points to run (the front at the final level),
        which go ahead of the queue. Returns the complete records and {point: error}."""
        by_chain = {}

        def add(pairs) -> list[list[Job]]:
            new = []
            for recipe, profile in pairs:
                c = self.chain(recipe, profile, stages)
                by_chain[c[0].chain] = (recipe, profile, c)
                new.append(c)
            return new

        chains = add(points)
        gating = {self.chain(r, p, stages)[0].chain for r, p in (points if gate is None else gate)} & set(by_chain)
        follow = [then] if then else []  # asked once, when every gating chain has ended
        records, settled = {}, set()

        def done(job: Job, gpu: str, error) -> list | None:
            chain = by_chain[job.chain][2]
            if error is not None:
                log(f"  {job.chain}: {job.stage} FAILED on GPU {gpu}: {error}")
            else:
                log(f"  {job.chain}: {job.stage} done on GPU {gpu}")
                if job.stage == chain[-1].stage:
                    rec = self.record_of(job)
                    if has_all_stages(rec):
                        records[job.chain] = rec
                        self.publish(list(records.values()))
            if error is not None or job.stage == chain[-1].stage:
                settled.add(job.chain)
                if follow and gating <= settled:
                    return add(follow.pop()([records[c] for c in gating if c in records]))
            return None

        with self.build_servers():
            failures = run_chains(chains, self.gpus, lambda job, gpu: self.launch(job, gpu, *by_chain[job.chain][:2]),
                                  self.jobs_per_gpu, done, stop_after)
        return list(records.values()), failures


def grid_setup(grid: Grid, setup: Setup) -> Setup:
    """The run's setup under the grid's timing protocol: every point of a sweep is timed alike."""
    b = grid.bench
    return replace(setup, cuda_graphs=b.cuda_graphs, duration_s=b.duration_s, warmup_ms=b.warmup_ms,
                   compare_images=b.compare_images)


def job_setup(grid: Grid, setup: Setup, recipe: Recipe) -> Setup:
    """The setup one point's jobs run under: the grid's, with the references' own comparison count where it has one."""
    n = grid.bench.compare_references
    return setup if n is None or recipe.name not in {r.name for r in grid.references} else \
        replace(setup, compare_images=n)


def run_sweep(grid: Grid, setup: Setup, stages, runner, stop_after=None, only=None, log=print):
    """CPU stages for every point here (quantization needs ModelOpt), then the GPU stages through `runner`: every
    point at the screening level if the grid has one, then the references, FP16 and the front at their own level.
    `only`: parts of point names to run (references always run, as the yardstick)."""
    refs = {r.name for r in grid.references}
    points = [p for p in expand(grid, setup) if not only or p.name in refs or any(o in p.name for o in only)]
    cpu = tuple(s for s in stages if not STAGES[s].gpu)
    gpu = tuple(s for s in stages if STAGES[s].gpu)
    failures = {}
    for recipe in points:
        try:
            run_recipe(screened(recipe, grid.screen), setup, cpu, log=log)
        except UserError as e:
            failures[recipe.name] = str(e)
            log(f"  {recipe.name}: FAILED: {e}")
    if not gpu:
        return [], failures
    points = [p for p in points if p.name not in failures]
    pairs = lambda recipes: [(r, p) for r in recipes for p in setup.engine_profiles(r)]  # noqa: E731
    if grid.screen is None:
        records, failed = runner(pairs(points), gpu, stop_after)
        return records, {**failures, **failed}
    # Queue: FP16 and the base at the final level first (the longest builds, and every INT8 point's yardsticks), then
    # the screening of every configuration; once it is done, the front and then the other references at the final
    # level go ahead of whatever is still queued (they are what the end of the run waits on).
    level = grid.screen.builder_optimization_level
    base = digest(setup.adapt(grid.base).settings())
    yardsticks = [r for r in points if r.precision == "fp16" or digest(r.settings()) == base]
    others = [r for r in points if r.name in refs and r not in yardsticks]
    screening = pairs([screened(r, grid.screen) for r in points])

    def front_and_references(done: list[dict]) -> list:
        best = front(sweep_rows([r for r in done if r["level"] == level], grid), grid.screen.front_max)
        return pairs([r for r in points if r.name in best and r not in yardsticks + others] + others)

    records, failed = runner(pairs(yardsticks) + screening, gpu, stop_after, front_and_references, screening)
    return records, {**failures, **failed}


def visible_gpus() -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return os.environ["CUDA_VISIBLE_DEVICES"].split(",")
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    return out or ["0"]


def rebuild_table(grid: Grid, layout: Layout, setup: Setup) -> None:
    """Rewrite the sweep table from the records on disk (after merging shards, say); the run's own fields are
    kept. Takes each point's newest complete record per level and profile."""
    records = engine_records(layout, [r.name for r in expand(grid, setup)], None)
    if not records:
        raise UserError(f"{layout.points}: no complete record of any point of this grid; run the sweep first")
    old = read_json(layout.sweep_json, "sweep table") if layout.sweep_json.is_file() else {}
    write_table(layout, grid, records, old)
    print(f"rebuilt {layout.sweep_csv} from {len(records)} records")


def shard(points: list, spec: str | None) -> list:
    if not spec:
        return points
    try:
        i, n = (int(x) for x in spec.split("/"))
        assert 1 <= i <= n
    except (ValueError, AssertionError):
        raise UserError(f"--shard {spec!r}: write i/n with 1 <= i <= n, e.g. --shard 1/2") from None
    return points[i - 1::n]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid")
    ap.add_argument("--stages", default="calib,quantize,engine,bench,accuracy",
                    help="comma-separated stages (default: all but onnxrt), or cpu / gpu")
    ap.add_argument("--list", action="store_true", help="print the expanded points and exit")
    ap.add_argument("--only", help="comma-separated parts of point names to run (references always run)")
    ap.add_argument("--table-only", action="store_true",
                    help="rebuild sweep.json/csv from the points' records (newest per point), running nothing")
    ap.add_argument("--stop-after", type=non_negative_number, metavar="SECONDS",
                    help="start no new point after this many seconds; the next run resumes (for time-limited jobs)")
    ap.add_argument("--gpus", help="comma-separated GPU indices to use (default: every visible GPU)")
    ap.add_argument("--jobs-per-gpu", type=positive_int, default=1,
                    help="builds side by side on one GPU (4 on one H200 gave 1.17x the throughput of one: default 1); "
                         "timings always run alone, accuracy runs beside builds")
    ap.add_argument("--shard", help="run only shard i of n of the points (i/n), e.g. one per machine; with a "
                                    "screened grid each shard takes its front from its own part of the screening")
    ap.add_argument("--build-servers", metavar="DIR",
                    help="fallback trtexec only: keep the GPUs' build servers (and their warm timing caches) in DIR "
                         "after the sweep, and use those a sweep left there (python -m tools.trtexec_py --stop "
                         "DIR/gpu0.sock ends one)")
    ap.add_argument("--layers", help="comma-separated references whose final-level engines also get a per-layer "
                                     "profile (the `layers` stage of `make profile`), e.g. fp16,int8-qdq")
    add_model(ap)
    add_setup_args(ap)
    args = ap.parse_args(argv)
    setup = setup_from_args(args)
    grid = load_grid(args.grid, model=args.model)
    if setup.level is not None and grid.screen is not None:
        raise UserError(f"{args.grid}: a screened grid builds at its screening level and then at the recipes' own; "
                        f"drop LEVEL= / --level, or the grid's screen: key")
    layout = setup.layout(grid.model)
    if args.list:
        for r in expand(grid, setup):
            print(f"{r.name:40s} {digest(r.settings())}  profiles {', '.join(setup.engine_profiles(r))}")
        return
    earlier, finished = earlier_runs(this_grids_table(layout.sweep_json, args.grid))
    if args.table_only:
        rebuild_table(grid, layout, setup)
        return
    stages = parse_stages(args.stages)
    if any(STAGES[s].gpu for s in stages) and not have_tensorrt():
        print("TensorRT is not installed here: running the CPU stages only (quantize every point)")
        stages = tuple(s for s in stages if not STAGES[s].gpu)
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    gpus = args.gpus.split(",") if args.gpus else visible_gpus()
    lock = threading.Lock()

    def publish(records, complete=False, failures=None):
        """Rewrite the sweep table after every point, so an interrupted sweep still leaves what it measured."""
        if not records:
            return
        with lock:
            measured = any(t >= started for r in records for t in r.get("measured_utc", {}).values())
            runs = run_seconds(earlier, finished, round(time.perf_counter() - t0), measured)
            write_table(layout, grid, records, {
                "grid": args.grid, "design": grid.design, "complete": complete, "failures": failures or {},
                "gpus": gpus, "jobs_per_gpu": args.jobs_per_gpu,
                "screen_level": grid.screen.builder_optimization_level if grid.screen else None,
                "final_level": setup.adapt(grid.base).builder_optimization_level,
                "run_seconds": runs, "seconds": sum(runs)})

    run_setup = grid_setup(grid, setup)
    runner = Runner(grid, run_setup, gpus, args.jobs_per_gpu, publish, args.layers.split(",") if args.layers else (),
                    args.build_servers)

    def run_points(pairs, gpu_stages, stop_after, then=None, gate=None):
        # what `then` adds (the front, the other references) is sharded too, or every machine would build all of it
        later = then and (lambda done: shard(then(done), args.shard))
        return runner.run(shard(pairs, args.shard), gpu_stages, stop_after, print, later, gate)

    records, failures = run_sweep(grid, run_setup, stages, run_points, args.stop_after,
                                  args.only.split(",") if args.only else None)
    publish(records, complete=not failures, failures=failures)
    if records:
        print(f"wrote {layout.sweep_csv}: {len(records)} engines")
    for name, err in failures.items():
        print(f"failed: {name}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
