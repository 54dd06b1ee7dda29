"""Run recipes end to end, resuming finished work: one stage table, CPU and GPU stages alike.

CPU stages (per recipe): calib (calibration tensor), quantize (ModelOpt Q/DQ model), onnxrt (ONNX Runtime mAP of the
model the engine starts from). GPU stages (per recipe and deployment profile, i.e. per engine): engine, bench,
accuracy, and `layers` (per-layer profile, run by `make profile`, not by `all`).
Every result is keyed by what it depends on (tools.records): an engine by the recipe's engine settings, its profile,
the ONNX bytes, the TensorRT version and the GPU; its record also by the evaluation set's content. A stage whose
result exists is skipped, so an interrupted run picks up where it stopped, and a changed input never reuses a result.
A point (one recipe, one profile) is a self-contained job: recipe + inputs -> one record file, so points can run in
parallel on several GPUs (tools.sweep) or machines, and their record folders merge by copying.
Usage: python -m tools.pipeline STAGES RECIPE...   (STAGES: comma-separated, or all / cpu / gpu)
"""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from tools.common import REPO, UserError, builder_level, default_trtexec, non_negative_int, positive_int, \
    positive_number, run_main
from tools.engine import AVG_TIMING
from tools.records import LOG_KEYS, RUNS, Layout, Record, eval_set, file_digest, now_utc, read_json
from tools.recipe import Recipe, add_model_arg, digest, load, to_dict
from tools.trt_plan import Plan, detect_version, plan

GRAPH_MODES = {"both": (False, True), "on": (True,), "off": (False,)}
COLLAPSE = 0.5  # a quantized model scoring under half the FP32 model's mAP has collapsed: an error, not a result


def have_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401

        return True
    except ImportError:
        return False


def gpu_name() -> str:
    """The GPU this process runs on: the first of CUDA_VISIBLE_DEVICES (nvidia-smi itself ignores that variable)."""
    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    try:
        out = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        return out[0].strip() if out else "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


@functools.lru_cache(maxsize=None)
def model_facts(path: str, sha256: str) -> dict:
    """tools.export's detector check, once per model content in a process."""
    from tools.export import check_detector

    return check_detector(path)


@dataclass(frozen=True)
class Setup:
    """Everything a run takes besides the recipes: data, tools, timing protocol and where results go."""
    calib_dir: Path
    eval_dir: Path
    root: Path = REPO
    results: Path = RUNS
    overwrite: bool = False
    onnx: Path | None = None  # the model to start from instead of the recipe's (Makefile ONNX=)
    profiles: tuple[str, ...] | None = None  # only these deployment profiles (default: every one of the recipe)
    level: int | None = None  # every recipe's builder_optimization_level for this run (default: the recipe's own)
    trt_version: str | None = None  # None: the installed TensorRT
    trtexec: tuple[str, ...] = field(default_factory=default_trtexec)
    polygraphy: tuple[str, ...] | None = None
    cuda_graphs: tuple[bool, ...] = (False, True)
    warmup_ms: int = 500
    duration_s: float = 3.0
    eval_limit: int | None = None
    calib_images: int | None = None  # caps every recipe's calib_images (e.g. for a small folder)
    compare_images: int = 4  # real images for the Polygraphy comparison; 0 skips it
    prep_cache: dict = field(default_factory=dict, compare=False, repr=False)  # preprocessed eval images

    def version(self) -> str:
        """The TensorRT to plan for: the one given, else the installed one, else trt_plan's default."""
        return self.trt_version or detect_version()

    def layout(self, model: str) -> Layout:
        return Layout(model, self.root, self.results, self.overwrite)

    def adapt(self, recipe: Recipe) -> Recipe:
        """The recipe as this run executes it: the ONNX override and the calibration-image cap applied, so names and
        keys say what actually ran (a capped n400 point is an n32 point)."""
        changes = {}
        if self.onnx is not None:
            changes["onnx"] = str(self.onnx)
        if self.calib_images and recipe.calibrated and recipe.calib_images > self.calib_images:
            changes["calib_images"] = self.calib_images
        if self.level is not None and recipe.builder_optimization_level != self.level:
            changes["builder_optimization_level"] = self.level
        return recipe.replace(**changes) if changes else recipe

    def engine_profiles(self, recipe: Recipe) -> list[str]:
        if self.profiles is None:
            return list(recipe.profiles)
        missing = [p for p in self.profiles if p not in recipe.profiles]
        if missing:
            raise UserError(f"recipe {recipe.name!r} has no profile {missing[0]!r}; its profiles are "
                            f"{', '.join(recipe.profiles)}")
        return list(self.profiles)


# ----------------------------------------------------------------------------------------------------------------
class Point:
    """One recipe on one TensorRT + GPU, and (for the GPU stages) one of its deployment profiles: every artifact's
    path and key, computed when first needed."""

    def __init__(self, recipe: Recipe, setup: Setup, profile: str | None = None):
        self.recipe, self.setup, self.profile = recipe, setup, profile
        self.layout = setup.layout(recipe.model)

    @cached_property
    def plan(self) -> Plan:
        return plan(self.recipe, self.setup.version())

    @cached_property
    def model_onnx(self) -> Path:
        """The recipe's model, checked to be a YOLO11 detector whose input takes every batch the profiles build for,
        before any work is done with it."""
        path = self.recipe.onnx_path
        if not path.is_file():
            raise UserError(f"{path}: no such ONNX model; run `make export` (or `make export PT=model.pt`) or set "
                            f"ONNX=path (recipe key `onnx:`)")
        facts = model_facts(str(path), file_digest(path))
        batch = facts["input"][0]
        wrong = [n for n, p in self.recipe.profiles.items() if isinstance(batch, int) and not p.min == p.max == batch]
        if wrong:
            raise UserError(f"{path}: takes batch {batch} only, but profile {wrong[0]!r} of recipe {self.recipe.name!r} "
                            f"builds for {self.recipe.profiles[wrong[0]].describe()}; export with a dynamic batch "
                            f"(make export, the default) or set the recipe's profiles to {{batch: {batch}}}")
        return path

    @cached_property
    def random_weights(self) -> bool:
        return model_facts(str(self.model_onnx), file_digest(self.model_onnx))["random_weights"]

    @cached_property
    def calib_npy(self) -> Path:
        from tools.quantize import calibration_name

        return calibration_name(self.recipe, self.setup.calib_dir, self.setup.root)

    @cached_property
    def onnx(self) -> Path:
        """The ONNX this engine is built from on this TensorRT (quantized or converted as the plan says)."""
        if self.plan.onnx_kind == "qdq":
            from tools.quantize import quantize

            return quantize(self.recipe, self.setup.version(), self.setup.calib_dir, self.setup.eval_dir,
                            self.setup.root)
        if self.plan.onnx_kind == "autocast-fp16":
            return autocast_fp16(self)
        return self.model_onnx

    @cached_property
    def engine_onnx(self) -> Path:
        """What the engine is built from: `onnx`, or (recipe key `deploy`) its end-to-end graph, made from the Q/DQ
        model after quantization so that its scales are the raw recipe's (tools/deploy_graph.py says why)."""
        if self.recipe.deploy is None:
            return self.onnx
        from tools.deploy_graph import build

        return build(self.onnx, self.recipe.deploy, self.layout)

    @cached_property
    def gpu(self) -> str:
        return gpu_name()

    @cached_property
    def implicit_cache(self) -> Path | None:
        if not self.plan.implicit_calibration:
            return None
        return self.calib_npy.with_name(f"{self.calib_npy.stem}.implicit-{self.recipe.implicit_calibrator}-"
                                        f"{self.setup.version()}-{file_digest(self.model_onnx)[:12]}.cache")

    @cached_property
    def engine_key(self) -> str:
        return digest({"settings": self.recipe.engine_settings(self.profile), "onnx": file_digest(self.engine_onnx),
                       "trt": self.setup.version(), "gpu": self.gpu, "avg_timing": AVG_TIMING,
                       "implicit_calibration": self.implicit_cache.name if self.implicit_cache else None})

    @cached_property
    def eval(self) -> dict:
        return eval_set(self.setup.eval_dir, self.setup.eval_limit)

    @cached_property
    def key(self) -> str:
        return digest({"engine": self.engine_key, "eval": self.eval["key"]})

    @property
    def engine_stem(self) -> str:
        return f"{self.recipe.name}.{self.profile}.{self.engine_key}"

    @property
    def engine_path(self) -> Path:
        return self.layout.engines / f"{self.engine_stem}.engine"

    @cached_property
    def record(self) -> Record:
        """This point's record: what is already known of it, or a fresh one saying what it will be built from."""
        path = self.layout.points / f"{self.recipe.name}.{self.profile}.{self.key}.json"
        return Record.open(path, self.fresh_record)

    def fresh_record(self) -> dict:
        """What a new record says before any stage ran: the recipe, the plan and what it is built from."""
        r, p = self.recipe, self.recipe.profiles[self.profile]
        qjson = self.onnx.with_suffix(".json")
        return {"name": r.name, "key": self.key, "engine_key": self.engine_key, "model": r.model,
                "random_weights": self.random_weights,
                "precision": r.precision, "profile": {"name": self.profile, **p.model_dump(), "static": p.static},
                "level": r.builder_optimization_level, "recipe": to_dict(r), "trt_version": self.setup.version(),
                "gpu": self.gpu, "plan": {"onnx_kind": self.plan.onnx_kind, "flags": list(self.plan.precision_flags),
                                          "notes": list(self.plan.notes)},
                "onnx": self.layout.rel(self.engine_onnx), "onnx_sha256": file_digest(self.engine_onnx),
                "eval": {"dir": str(self.setup.eval_dir), "limit": self.setup.eval_limit, **self.eval},
                "quantization": read_json(qjson, "quantization record") if self.plan.onnx_kind == "qdq" and
                qjson.is_file() else None}


def autocast_path(point: Point) -> Path:
    """Where autocast_fp16 writes the point's FP16 model (named by the source's bytes and the image size)."""
    recipe, source = point.recipe, point.model_onnx
    size = f"-{recipe.imgsz}" if recipe.imgsz != 640 else ""  # AutoCast judges overflow on an image of that size
    return point.layout.quant / f"{recipe.model}.autocast-fp16{size}.{file_digest(source)[:12]}.onnx"


def autocast_fp16(point: Point) -> Path:
    """TensorRT 11 has no --fp16: bake FP16 into the ONNX with ModelOpt AutoCast (as Ultralytics 8.4 does). AutoCast
    keeps in FP32 the nodes whose activations overflow FP16, judged on one real calibration image (its default
    random input fails on a dynamic-shape model); the model keeps FP32 inputs and outputs."""
    from tools.calib import build_calibration
    from tools.common import atomic_path
    from tools.engine import run_logged
    from tools.quantize import modelopt_scratch

    recipe, setup, layout = point.recipe, point.setup, point.layout
    source = point.model_onnx
    out = autocast_path(point)
    if out.is_file():
        return out
    image = layout.calib / f"autocast-{recipe.imgsz}-n1.npz"  # AutoCast reads .npz keyed by input name
    if not image.is_file():
        build_calibration(setup.calib_dir, image.with_suffix(".npy"), 1, 0, recipe.imgsz, setup.eval_dir)
        with atomic_path(image) as tmp:
            np.savez(tmp, images=np.load(image.with_suffix(".npy")))
    log = layout.logs / f"{out.stem}.log"
    with modelopt_scratch(source, out) as (model, result):
        cmd = [sys.executable, "-m", "modelopt.onnx.autocast", "--onnx_path", str(model), "--output_path",
               str(result), "--low_precision_type", "fp16", "--calibration_data", str(image), "--keep_io_types"]
        rc, _ = run_logged(cmd, log)
        if rc != 0 or not result.is_file() or not result.stat().st_size:
            raise UserError(f"{log}: ModelOpt AutoCast failed (exit {rc}); read the log's last lines")
        os.replace(result, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stages. Each is (name, GPU or not, for which recipes, done?, run); the GPU ones write into the point's record.
def calib_run(point: Point) -> None:
    from tools.calib import build_calibration

    r = point.recipe
    build_calibration(point.setup.calib_dir, point.calib_npy, r.calib_images, r.calib_seed, r.imgsz,
                      point.setup.eval_dir)


def quantize_run(point: Point) -> None:
    print(f"  {point.recipe.name}: quantized model {point.layout.rel(point.onnx)}")


def quantize_done(point: Point) -> bool:
    from tools.quantize import quantized_path

    return quantized_path(point.recipe, point.plan.high_precision_dtype, point.setup.root,
                          point.calib_npy.stem).is_file()


def onnxrt_source(point: Point) -> Path:
    """The model the engine starts from: the recipe's Q/DQ model, or the FP32 one."""
    return point.onnx if point.plan.onnx_kind == "qdq" else point.model_onnx


def onnxrt_kind(point: Point, onnx: Path) -> str:
    return "fp32" if onnx == point.model_onnx else point.recipe.name


def onnxrt_path(point: Point, onnx: Path) -> Path:
    # the image size joins the key only off its default, so the scores of 640 recipes keep their names
    size = {"imgsz": point.recipe.imgsz} if point.recipe.imgsz != 640 else {}
    key = digest({"onnx": file_digest(onnx), "eval": point.eval["key"], **size})
    return point.layout.onnxrt / f"{onnxrt_kind(point, onnx)}.{key}.json"


def onnxrt_score(point: Point, onnx: Path) -> dict:
    """ONNX Runtime mAP of `onnx` on the evaluation set at the recipe's image size, cached by content (model bytes,
    evaluation set, image size)."""
    from tools.evaluate import evaluate

    out = onnxrt_path(point, onnx)
    if out.is_file():
        return read_json(out, "ONNX Runtime result")
    res = evaluate(onnx, point.setup.eval_dir, limit=point.setup.eval_limit, batch=8, imgsz=point.recipe.imgsz)
    res.update(kind=onnxrt_kind(point, onnx), onnx=point.layout.rel(onnx),
               onnx_sha256=file_digest(onnx), eval=point.eval, updated_utc=now_utc())
    point.layout.write_json(out, res)
    return res


def onnxrt_run(point: Point) -> None:
    """Score the model the engine starts from; a quantized model that collapses against FP32 is an error."""
    source = onnxrt_source(point)
    res = onnxrt_score(point, source)
    if point.random_weights:
        print(f"  {point.recipe.name}: ONNX Runtime {res['kind']}: random weights, no accuracy to speak of")
        return
    print(f"  {point.recipe.name}: ONNX Runtime {res['kind']} mAP50-95 {res['map50_95']:.4f} ({res['images']} images)")
    if source == point.model_onnx:
        return
    fp32 = onnxrt_score(point, point.model_onnx)
    if res["map50_95"] < COLLAPSE * fp32["map50_95"]:
        raise UserError(f"{source}: ONNX Runtime mAP50-95 {res['map50_95']:.4f} against the FP32 model's "
                        f"{fp32['map50_95']:.4f}: this quantized model collapsed; do not deploy it (check its "
                        f"high_precision_dtype and calibration, see README 'Known issues')")


def onnxrt_done(point: Point) -> bool:
    return onnxrt_path(point, onnxrt_source(point)).is_file()


def onnxrt_results(point: Point) -> list[Path]:
    """The ONNX Runtime results this recipe's run stands on (its model's, and FP32's beside a Q/DQ model) as they
    exist now, found by their keys, without building anything: what a summary of the run shows."""
    wanted = [point.model_onnx]
    if point.plan.onnx_kind == "qdq":
        from tools.quantize import quantized_path

        qdq = quantized_path(point.recipe, point.plan.high_precision_dtype, point.setup.root, point.calib_npy.stem)
        wanted = [qdq, point.model_onnx] if qdq.is_file() else [point.model_onnx]
    return [p for p in (onnxrt_path(point, onnx) for onnx in wanted) if p.is_file()]


def engine_run(point: Point) -> None:
    from tools.engine import build
    from tools.trtlog import parse_file

    r, setup, layout = point.recipe, point.setup, point.layout
    log = layout.logs / f"{point.engine_stem}.build.log"
    cache = None
    if r.timing_cache:  # TensorRT refuses a cache from another precision or level: one cache per combination
        cache_key = digest([setup.version(), point.gpu, point.plan.precision_flags, r.builder_optimization_level])
        cache = layout.engines / f"timing-{cache_key}.cache"
    calib_cache = implicit_calibration(point) if point.plan.implicit_calibration else None
    if not point.engine_path.is_file():
        build(r, point.profile, point.plan, list(setup.trtexec), point.engine_onnx, point.engine_path, log, cache,
              calib_cache)
    parsed = parse_file(log)
    point.record.data["build"] = {"engine": layout.rel(point.engine_path), "log": layout.rel(log),
                                  "build_s": parsed.get("build_s"),
                                  "engine_mb": round(point.engine_path.stat().st_size / 1e6, 3),
                                  "fallback": parsed["fallback"], "timing_cache": bool(cache)}


def implicit_calibration(point: Point) -> Path:
    from tools.implicit_calib import calibration_cache

    r, cache = point.recipe, point.implicit_cache
    if not cache.is_file():
        if not point.calib_npy.is_file():
            calib_run(point)
        t0 = time.perf_counter()
        calibration_cache(point.model_onnx, point.calib_npy, cache, r.implicit_calibrator)
        print(f"  TensorRT {r.implicit_calibrator} calibration on {r.calib_images} images: "
              f"{time.perf_counter() - t0:.0f} s")
    point.record.data["implicit_calibration"] = {"algorithm": r.implicit_calibrator, "images": r.calib_images,
                                                 "cache": point.layout.rel(cache)}
    return cache


def protocol(setup: Setup) -> dict:
    return {"warmup_ms": setup.warmup_ms, "duration_s": setup.duration_s}


def missing_timings(point: Point) -> list[tuple[int, bool]]:
    """(batch, CUDA graph) runs this setup asks for that the record lacks under this setup's timing protocol."""
    want = protocol(point.setup)
    have = {(b["batch"], b["cuda_graph"]) for b in point.record.data.get("bench", [])
            if {k: b.get(k) for k in want} == want}
    batches = point.recipe.profiles[point.profile].bench
    return [(b, g) for b in batches for g in point.setup.cuda_graphs if (b, g) not in have]


def bench_run(point: Point) -> None:
    """Time the engine at its profile's batches; rows of another timing protocol are replaced, so a record's
    timings always share one protocol."""
    from tools.bench import bench
    from tools.engine import input_layout

    setup, layout = point.setup, point.layout
    engine = layout.resolve(point.record.data["build"]["engine"])
    prefix = layout.logs / point.engine_stem
    want = protocol(setup)
    rows = [b for b in point.record.data.get("bench", []) if {k: b.get(k) for k in want} == want]
    for batch, graph in missing_timings(point):
        new = bench(engine, list(setup.trtexec), prefix, [batch], point.recipe.imgsz, (graph,), setup.warmup_ms,
                    setup.duration_s, input_layout(point.recipe))
        rows += [{**row, **want, "gpu_index": os.environ.get("CUDA_VISIBLE_DEVICES", "0"),
                  "log": layout.rel(row["log"])} for row in new]
    point.record.data["bench"] = sorted(rows, key=lambda r: (r["batch"], r["cuda_graph"]))


def accuracy_run(point: Point) -> None:
    from tools.compare import compare
    from tools.evaluate import evaluate

    setup, layout, rec = point.setup, point.layout, point.record.data
    engine = layout.resolve(rec["build"]["engine"])
    if "accuracy" not in rec:
        profile = point.recipe.profiles[point.profile]
        acc = evaluate(engine, setup.eval_dir, batch=min(32, profile.max), imgsz=point.recipe.imgsz,
                       limit=setup.eval_limit, prep_cache=setup.prep_cache)
        rec["accuracy"] = {k: acc[k] for k in ("images", "map50_95", "map50", "exact", "halves") if k in acc}
    if setup.compare_images and "compare" not in rec and point.recipe.deploy is not None:
        # Polygraphy compares the raw head on float inputs; the mAP above is this engine's comparison
        rec["compare"] = {"skipped": "end-to-end engine (recipe key deploy): uint8 input and its own outputs"}
    if setup.compare_images and "compare" not in rec:
        work = layout.logs / "compare"
        rec["compare"] = compare(engine, point.model_onnx, setup.eval_dir, work, setup.compare_images,
                                 polygraphy=list(setup.polygraphy) if setup.polygraphy else None,
                                 imgsz=point.recipe.imgsz)


def accuracy_done(point: Point) -> bool:
    rec = point.record.data
    return "accuracy" in rec and (not point.setup.compare_images or "compare" in rec)


def layers_run(point: Point) -> None:
    from tools.engine import input_layout
    from tools.profile import profile_engine

    layout, rec = point.layout, point.record.data
    profile = point.recipe.profiles[point.profile]
    found = profile_engine(layout.resolve(rec["build"]["engine"]), list(point.setup.trtexec),
                           layout.logs / point.engine_stem, profile.max, point.recipe.imgsz,
                           input_layout(point.recipe))
    rec["layers"] = {k: layout.rel(v) if k in LOG_KEYS else v for k, v in found.items()}


@dataclass(frozen=True)
class Stage:
    name: str
    gpu: bool
    applies: Callable[[Recipe], bool]
    done: Callable[[Point], bool]
    run: Callable[[Point], None]
    record_key: str | None = None  # the part of the point record this stage writes (GPU stages)


def _record_has(key: str) -> Callable[[Point], bool]:
    return lambda point: key in point.record.data


STAGE_TABLE = (
    Stage("calib", False, lambda r: r.calibrated, lambda p: p.calib_npy.is_file(), calib_run),
    Stage("quantize", False, lambda r: r.quantized, quantize_done, quantize_run),
    Stage("onnxrt", False, lambda r: r.precision != "int8-implicit", onnxrt_done, onnxrt_run),
    Stage("engine", True, lambda r: True, lambda p: _record_has("build")(p) and p.engine_path.is_file(), engine_run,
          "build"),
    Stage("bench", True, lambda r: True, lambda p: "bench" in p.record.data and not missing_timings(p), bench_run,
          "bench"),
    Stage("accuracy", True, lambda r: True, accuracy_done, accuracy_run, "accuracy"),
    Stage("layers", True, lambda r: True, _record_has("layers"), layers_run, "layers"),
)
STAGES = {s.name: s for s in STAGE_TABLE}
STAGE_SETS = {"all": ("calib", "quantize", "onnxrt", "engine", "bench", "accuracy"),
              "cpu": ("calib", "quantize", "onnxrt"), "gpu": ("engine", "bench", "accuracy")}
RESULT_STAGES = ("engine", "bench", "accuracy")  # what a finished point record holds: the result tables need them


def has_all_stages(record: dict | None) -> bool:
    """Whether a point's record holds the result of every stage the result tables are built from."""
    return bool(record) and all(STAGES[s].record_key in record for s in RESULT_STAGES)


def run_recipe(recipe: Recipe, setup: Setup, stages=STAGE_SETS["all"], log=print) -> list[dict]:
    """Run `stages` of one recipe (CPU stages once, GPU stages once per deployment profile); returns the records of
    the engines it touched."""
    recipe = setup.adapt(recipe)
    cpu = Point(recipe, setup)
    cpu.model_onnx  # the model is checked (a YOLO detector, batch sizes the profiles need) before any work
    if recipe.calibrated and stages:  # a tensor made earlier was checked against the evaluation set of then
        from tools.calib import check_disjoint, select_images
        from tools.common import list_images

        check_disjoint(select_images(list_images(setup.calib_dir), recipe.calib_images, recipe.calib_seed),
                       setup.eval_dir)
    for stage in (STAGES[s] for s in stages if not STAGES[s].gpu):
        if stage.applies(recipe) and not stage.done(cpu):
            stage.run(cpu)
    gpu_stages = [STAGES[s] for s in stages if STAGES[s].gpu]
    if not gpu_stages:
        return []
    records = []
    for profile in setup.engine_profiles(recipe):
        point = Point(recipe, setup, profile)
        for stage in gpu_stages:
            if stage.done(point):
                continue
            if stage.name != "engine" and "build" not in point.record.data:
                raise UserError(f"recipe {recipe.name!r}: no engine yet for stage {stage.name}; run the engine stage "
                                f"first")
            t0 = time.perf_counter()
            stage.run(point)
            rec = point.record.data
            rec.setdefault("measured_utc", {})[stage.name] = now_utc()
            spent = rec.setdefault("stage_seconds", {})
            spent[stage.name] = round(spent.get(stage.name, 0) + time.perf_counter() - t0, 1)
            point.record.save(point.layout)
            log(f"  {recipe.name} [{profile}]: {stage.name} done in {time.perf_counter() - t0:.0f} s")
        log(f"record: {point.record.path}")
        records.append(point.record.data)
    return records


def check_names(recipes: list[Recipe], paths) -> None:
    """Results are filed by recipe name: two recipes of one name in a run would share (and overwrite) one row."""
    seen = {}
    for recipe, path in zip(recipes, paths):
        if recipe.name in seen:
            raise UserError(f"{path}: recipe name {recipe.name!r} is also the name of {seen[recipe.name]}; give each "
                            f"recipe of a run its own `name:`")
        seen[recipe.name] = path


def parse_stages(text: str) -> tuple[str, ...]:
    if text in STAGE_SETS:
        return STAGE_SETS[text]
    stages = tuple(s for s in text.split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise UserError(f"unknown stage {(bad or [text])[0]!r}; stages are {', '.join(STAGES)} or "
                        f"{', '.join(STAGE_SETS)}")
    return stages


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The flags every driver (pipeline, sweep) shares, each spelled once and mapped onto Setup."""
    ap.add_argument("--calib-dir", default=str(REPO / "calib" / "images"), help="calibration images")
    ap.add_argument("--eval-dir", default=str(REPO / "data" / "coco-mini"), help="evaluation images + annotations")
    ap.add_argument("--results", default=str(RUNS),
                    help="where records and tables go (default: runs/; results/ is the committed set)")
    ap.add_argument("--overwrite", action="store_true", help="replace committed (git-tracked) result files")
    ap.add_argument("--onnx", help="start from this ONNX instead of each recipe's model")
    ap.add_argument("--profiles", help="comma-separated deployment profiles to build (default: each recipe's all)")
    ap.add_argument("--level", type=builder_level,
                    help="build every recipe at this builder optimization level (0-5; default: each recipe's own)")
    ap.add_argument("--trt", help="TensorRT version (default: the installed one; 10 when planning without it)")
    ap.add_argument("--trtexec", help="trtexec command (default: trtexec if on PATH, else python -m tools.trtexec_py)")
    ap.add_argument("--polygraphy", help="polygraphy command (default: polygraphy, else python -m tools.polygraphy_cli)")
    ap.add_argument("--cuda-graphs", choices=GRAPH_MODES, default="both",
                    help="time with CUDA graphs, without, or both (default)")
    ap.add_argument("--duration", type=positive_number, default=3.0, help="seconds timed per (batch, graph) run")
    ap.add_argument("--warmup-ms", type=positive_int, default=500)
    ap.add_argument("--eval-limit", type=positive_int, help="score only the first N evaluation images")
    ap.add_argument("--compare-images", type=non_negative_int, default=4,
                    help="real images for the Polygraphy comparison against ONNX Runtime (0: skip it)")
    ap.add_argument("--calib-images", type=positive_int,
                    help="cap every recipe's calib_images (e.g. for a small folder); names follow the capped count")


def setup_from_args(args) -> Setup:
    onnx = Path(args.onnx).resolve() if args.onnx else None
    if onnx is not None and not onnx.is_file():
        raise UserError(f"{args.onnx}: no such ONNX model (ONNX= / --onnx); export one with make export")
    return Setup(calib_dir=Path(args.calib_dir), eval_dir=Path(args.eval_dir), results=Path(args.results).resolve(),
                 overwrite=args.overwrite, onnx=onnx,
                 profiles=tuple(args.profiles.split(",")) if args.profiles else None, level=args.level,
                 trt_version=args.trt,
                 trtexec=tuple(shlex.split(args.trtexec)) if args.trtexec else default_trtexec(),
                 polygraphy=tuple(shlex.split(args.polygraphy)) if args.polygraphy else None,
                 cuda_graphs=GRAPH_MODES[args.cuda_graphs], warmup_ms=args.warmup_ms, duration_s=args.duration,
                 eval_limit=args.eval_limit, calib_images=args.calib_images, compare_images=args.compare_images)


def setup_to_args(setup: Setup) -> list[str]:
    """The flags that give `setup` back through setup_from_args: how a sweep hands its setup to each job."""
    mode = next(m for m, g in GRAPH_MODES.items() if g == setup.cuda_graphs)
    args = ["--calib-dir", str(setup.calib_dir), "--eval-dir", str(setup.eval_dir), "--results", str(setup.results),
            "--trtexec", shlex.join(setup.trtexec), "--cuda-graphs", mode, "--duration", f"{setup.duration_s:g}",
            "--warmup-ms", str(setup.warmup_ms), "--compare-images", str(setup.compare_images)]
    for flag, value in (("--onnx", setup.onnx), ("--level", setup.level), ("--trt", setup.trt_version),
                        ("--eval-limit", setup.eval_limit),
                        ("--calib-images", setup.calib_images),
                        ("--polygraphy", shlex.join(setup.polygraphy) if setup.polygraphy else None)):
        if value is not None:
            args += [flag, str(value)]
    return args + (["--overwrite"] if setup.overwrite else [])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", help="comma-separated stages, or all / cpu / gpu")
    ap.add_argument("recipes", nargs="+")
    add_model_arg(ap)
    add_setup_args(ap)
    args = ap.parse_args(argv)
    stages = parse_stages(args.stages)
    setup = setup_from_args(args)
    gpu_stages = [s for s in stages if STAGES[s].gpu]
    if gpu_stages and not have_tensorrt():
        print(f"skipped {', '.join(gpu_stages)}: TensorRT is not installed here (python -c 'import tensorrt' fails)")
        stages = tuple(s for s in stages if not STAGES[s].gpu)
        if not stages:
            return
    recipes = [load(path, args.model) for path in args.recipes]  # every recipe checked before any work
    check_names(recipes, args.recipes)
    failed = []
    for recipe in recipes:  # like make -k: one recipe's failure does not stop the others
        t0 = time.perf_counter()
        try:
            run_recipe(recipe, setup, stages)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(recipe.name)
            continue
        print(f"{recipe.name}: {','.join(stages)} finished in {time.perf_counter() - t0:.0f} s")
    if failed:
        raise UserError(f"recipe(s) {', '.join(failed)} failed; see the errors above")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run_main(main)
