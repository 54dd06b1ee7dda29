"""Run recipes end to end, resuming finished work: one stage table, CPU and GPU stages alike.

CPU stages (per recipe): calib (calibration tensor), quantize (ModelOpt Q/DQ model), onnxrt (ONNX Runtime mAP of the
model the engine starts from). GPU stages (per recipe and deployment profile, i.e. per engine): engine, bench,
accuracy, and `layers` (per-layer profile, run by `make profile`, not by `all`).
Every result is keyed by what it depends on (tools/core/): an engine by the recipe's engine settings, its profile,
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
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from tools.bench import bench, time_layers
from tools.calib import build_calibration, check_disjoint, select_images
from tools.compare import compare
from tools.core.cli import add_model
from tools.core.errors import UserError, run_main
from tools.core.files import atomic_path, digest, eval_set, file_digest, list_images, run_logged
from tools.core.recipe import Recipe, load, to_dict
from tools.core.record import LOG_KEYS, Build, ImplicitCalibration, Layers, PointRecord, Record, now_utc, read_json
from tools.core.setup import Setup, add_setup_args, setup_from_args
from tools.deploy_graph import build as end_to_end_graph, graph_path
from tools.engine import build, input_layout
from tools.evaluate import evaluate
from tools.export import check_detector
from tools.implicit_calib import calibration_cache
from tools.quantize import calibration_name, modelopt_scratch, quantization_record, quantize, quantized_path
from tools.trt_plan import Plan, plan
from tools.trtexec_py import AVG_TIMING
from tools.trtlog import parse_file
from tools.yolo.graph_rewrites import rewritten

COLLAPSE = 0.5  # a quantized model scoring under half the FP32 model's mAP has collapsed: an error, not a result


def have_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401 (optional: only the GPU side has TensorRT)

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
    return check_detector(path)


# ----------------------------------------------------------------------------------------------------------------
class Point:
    """One recipe on one TensorRT + GPU, and (for the GPU stages) one of its deployment profiles: every artifact's
    path and key, computed when first needed. A Point only reads: the stages make the files (make_onnx, the stage
    table), and a key that hashes a file's content needs the file to exist."""

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
        return calibration_name(self.recipe, self.setup.calib_dir, self.setup.root)

    @cached_property
    def onnx(self) -> Path:
        """The ONNX this engine is built from on this TensorRT (quantized or converted as the plan says): the quantize
        stage writes the Q/DQ model there (its name is tools.quantize's quantized_path), make_onnx the AutoCast one."""
        if self.plan.onnx_kind == "qdq":
            return quantized_path(self.recipe, self.plan.high_precision_dtype, self.setup.root, self.calib_npy.stem)
        if self.plan.onnx_kind == "autocast-fp16":
            return self.layout.autocast_onnx(self.fp32_onnx, self.recipe.imgsz)
        return self.fp32_onnx

    @cached_property
    def fp32_onnx(self) -> Path:
        """The FP32 model an fp16 engine starts from: the recipe's model with its graph_rewrites applied, if any
        (make_onnx writes it; an int8-qdq recipe's are applied by the quantize step, before ModelOpt)."""
        return self.layout.rewritten_onnx(self.model_onnx, self.recipe.graph_rewrites)

    @cached_property
    def engine_onnx(self) -> Path:
        """What the engine is built from: `onnx`, or (recipe key `deploy`) its end-to-end graph, made from the Q/DQ
        model after quantization so that its scales are the raw recipe's (tools/deploy_graph.py says why)."""
        if self.recipe.deploy is None:
            return self.onnx
        return graph_path(self.onnx, self.recipe.deploy, self.layout)

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
        if not self.engine_onnx.is_file():
            raise UserError(f"{self.engine_onnx}: the ONNX recipe {self.recipe.name!r} builds its engines from is not "
                            f"made yet; run its CPU stages first (make cpu RECIPES=..., or make quantize RECIPE=...)")
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
        return self.layout.engine(self.engine_stem)

    @cached_property
    def record(self) -> Record:
        """This point's record: what is already known of it, or a fresh one saying what it will be built from."""
        return Record.open(self.layout.point_record(self.recipe.name, self.profile, self.key), self.fresh_record)

    def fresh_record(self) -> PointRecord:
        """What a new record says before any stage ran: the recipe, the plan and what it is built from."""
        r, p = self.recipe, self.recipe.profiles[self.profile]
        qjson = quantization_record(self.onnx)
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


def autocast_fp16(point: Point) -> Path:
    """TensorRT 11 has no --fp16: bake FP16 into the ONNX with ModelOpt AutoCast (as Ultralytics 8.4 does). AutoCast
    keeps in FP32 the nodes whose activations overflow FP16, judged on one real calibration image (its default
    random input fails on a dynamic-shape model); the model keeps FP32 inputs and outputs."""
    recipe, setup, layout = point.recipe, point.setup, point.layout
    source, out = point.fp32_onnx, point.onnx  # AutoCast judges overflow on an image of the recipe's size
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


def make_onnx(point: Point) -> None:
    """Make what `point.engine_onnx` names where it is missing, before any stage reads it (or hashes it into a key):
    the Q/DQ model (the quantize stage), ModelOpt AutoCast's FP16 model (TensorRT 11), then the end-to-end graph
    (recipe key `deploy`); an FP16 recipe's graph rewrites first, since AutoCast's model is named by their bytes."""
    if point.plan.onnx_kind != "qdq":
        rewritten(point.layout, point.model_onnx, point.recipe.graph_rewrites)
    if point.plan.onnx_kind == "qdq" and not quantize_done(point):
        quantize_run(point)
    if point.plan.onnx_kind == "autocast-fp16" and not point.onnx.is_file():
        autocast_fp16(point)
    if point.recipe.deploy is not None and not point.engine_onnx.is_file():
        end_to_end_graph(point.onnx, point.recipe.deploy, point.layout)


# ----------------------------------------------------------------------------------------------------------------
# Stages. Each is (name, GPU or not, for which recipes, done?, run); the GPU ones write into the point's record.
def calib_run(point: Point) -> None:
    r = point.recipe
    build_calibration(point.setup.calib_dir, point.calib_npy, r.calib_images, r.calib_seed, r.imgsz,
                      point.setup.eval_dir)


def quantize_run(point: Point) -> None:
    s = point.setup
    made = quantize(point.recipe, s.version(), s.calib_dir, s.eval_dir, s.root)
    print(f"  {point.recipe.name}: quantized model {point.layout.rel(made)}")


def quantize_done(point: Point) -> bool:
    return point.onnx.is_file()


def onnxrt_source(point: Point) -> Path:
    """The model the engine starts from: the recipe's Q/DQ model, or the FP32 one."""
    return point.onnx if point.plan.onnx_kind == "qdq" else point.model_onnx


def onnxrt_kind(point: Point, onnx: Path) -> str:
    return "fp32" if onnx == point.model_onnx else point.recipe.name


def onnxrt_path(point: Point, onnx: Path) -> Path:
    # the image size joins the key only off its default, so the scores of 640 recipes keep their names
    size = {"imgsz": point.recipe.imgsz} if point.recipe.imgsz != 640 else {}
    key = digest({"onnx": file_digest(onnx), "eval": point.eval["key"], **size})
    return point.layout.onnxrt_result(onnxrt_kind(point, onnx), key)


def onnxrt_score(point: Point, onnx: Path) -> dict:
    """ONNX Runtime mAP of `onnx` on the evaluation set at the recipe's image size, cached by content (model bytes,
    evaluation set, image size)."""
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
    if point.plan.onnx_kind == "qdq" and point.onnx.is_file():
        wanted = [point.onnx, point.model_onnx]
    return [p for p in (onnxrt_path(point, onnx) for onnx in wanted) if p.is_file()]


def engine_run(point: Point) -> None:
    r, setup, layout = point.recipe, point.setup, point.layout
    log = layout.logs / f"{point.engine_stem}.build.log"
    cache = None
    if r.timing_cache:  # TensorRT refuses a cache from another precision or level: one cache per combination
        cache_key = digest([setup.version(), point.gpu, point.plan.precision_flags, r.builder_optimization_level])
        cache = layout.timing_cache(cache_key)
    calib_cache = implicit_calibration(point) if point.plan.implicit_calibration else None
    # an engine already at its keyed path was built from these inputs, on this GPU model and TensorRT version, by an
    # earlier run (here, or carried with its build log from a lease before): it is timed and scored anew, not rebuilt
    reused = point.engine_path.is_file()
    if not reused:
        build(r, point.profile, point.plan, list(setup.trtexec), point.engine_onnx, point.engine_path, log, cache,
              calib_cache)
    elif not log.is_file():
        raise UserError(f"{point.engine_path}: engine without its build log {log}; bring the log along with it, or "
                        f"delete the engine to rebuild it")
    parsed = parse_file(log)
    point.record.data["build"] = Build(engine=layout.rel(point.engine_path), log=layout.rel(log),
                                       build_s=parsed.get("build_s"),
                                       engine_mb=round(point.engine_path.stat().st_size / 1e6, 3),
                                       fallback=parsed["fallback"], timing_cache=bool(cache), reused=reused)


def implicit_calibration(point: Point) -> Path:
    r, cache = point.recipe, point.implicit_cache
    if not cache.is_file():
        if not point.calib_npy.is_file():
            calib_run(point)
        t0 = time.perf_counter()
        calibration_cache(point.model_onnx, point.calib_npy, cache, r.implicit_calibrator)
        print(f"  TensorRT {r.implicit_calibrator} calibration on {r.calib_images} images: "
              f"{time.perf_counter() - t0:.0f} s")
    point.record.data["implicit_calibration"] = ImplicitCalibration(algorithm=r.implicit_calibrator,
                                                                    images=r.calib_images,
                                                                    cache=point.layout.rel(cache))
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
    if setup.compare_images and "compare" not in rec and not point.recipe.float_io:
        rec["compare"] = {"skipped": "engine I/O formats off fp32:chw: Polygraphy feeds and reads the ONNX's float32"}
    if setup.compare_images and "compare" not in rec:
        work = layout.logs / "compare"
        rec["compare"] = compare(engine, point.model_onnx, setup.eval_dir, work, setup.compare_images,
                                 polygraphy=list(setup.polygraphy) if setup.polygraphy else None,
                                 imgsz=point.recipe.imgsz)


def accuracy_done(point: Point) -> bool:
    rec = point.record.data
    return "accuracy" in rec and (not point.setup.compare_images or "compare" in rec)


def layers_run(point: Point) -> None:
    layout, rec = point.layout, point.record.data
    profile = point.recipe.profiles[point.profile]
    found = time_layers(layout.resolve(rec["build"]["engine"]), list(point.setup.trtexec),
                           layout.logs / point.engine_stem, profile.max, point.recipe.imgsz,
                           input_layout(point.recipe))
    rec["layers"] = Layers(**{k: layout.rel(v) if k in LOG_KEYS else v for k, v in found.items()})


@dataclass(frozen=True)
class Stage:
    name: str
    gpu: bool
    applies: Callable[[Recipe], bool]
    done: Callable[[Point], bool]
    run: Callable[[Point], None]
    record_key: str | None = None  # the part of the point record this stage writes (GPU stages)
    reads_onnx: bool = False  # reads (or keys by) the ONNX the engine is built from: make_onnx makes it first


def _record_has(key: str) -> Callable[[Point], bool]:
    return lambda point: key in point.record.data


STAGE_TABLE = (
    Stage("calib", False, lambda r: r.calibrated, lambda p: p.calib_npy.is_file(), calib_run),
    Stage("quantize", False, lambda r: r.quantized, quantize_done, quantize_run),
    Stage("onnxrt", False, lambda r: r.precision != "int8-implicit", onnxrt_done, onnxrt_run, reads_onnx=True),
    Stage("engine", True, lambda r: True, lambda p: _record_has("build")(p) and p.engine_path.is_file(), engine_run,
          "build", reads_onnx=True),
    Stage("bench", True, lambda r: True, lambda p: "bench" in p.record.data and not missing_timings(p), bench_run,
          "bench", reads_onnx=True),
    Stage("accuracy", True, lambda r: True, accuracy_done, accuracy_run, "accuracy", reads_onnx=True),
    Stage("layers", True, lambda r: True, _record_has("layers"), layers_run, "layers", reads_onnx=True),
)
STAGES = {s.name: s for s in STAGE_TABLE}
STAGE_SETS = {"all": ("calib", "quantize", "onnxrt", "engine", "bench", "accuracy"),
              "cpu": ("calib", "quantize", "onnxrt"), "gpu": ("engine", "bench", "accuracy")}
def run_recipe(recipe: Recipe, setup: Setup, stages=STAGE_SETS["all"], log=print) -> list[dict]:
    """Run `stages` of one recipe (CPU stages once, GPU stages once per deployment profile); returns the records of
    the engines it touched."""
    recipe = setup.adapt(recipe)
    cpu = Point(recipe, setup)
    cpu.model_onnx  # the model is checked (a YOLO detector, batch sizes the profiles need) before any work
    if recipe.calibrated and stages:  # a tensor made earlier was checked against the evaluation set of then
        check_disjoint(select_images(list_images(setup.calib_dir), recipe.calib_images, recipe.calib_seed),
                       setup.eval_dir)
    for stage in (STAGES[s] for s in stages if not STAGES[s].gpu):
        if stage.applies(recipe) and stage.reads_onnx:
            make_onnx(cpu)
        if stage.applies(recipe) and not stage.done(cpu):
            stage.run(cpu)
    gpu_stages = [STAGES[s] for s in stages if STAGES[s].gpu]
    if not gpu_stages:
        return []
    if any(s.reads_onnx for s in gpu_stages):  # an engine's record is keyed by the bytes of its ONNX
        make_onnx(cpu)
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", help="comma-separated stages, or all / cpu / gpu")
    ap.add_argument("recipes", nargs="+")
    add_model(ap)
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
