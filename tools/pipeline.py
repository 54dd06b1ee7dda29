"""Run recipes end to end: quantize (CPU, ModelOpt) -> engine -> bench -> accuracy, resuming finished work.

Every engine-side result of a recipe lands in one record, results/<model>/points/<name>.<key>.json, where the key
hashes the recipe's settings, the ONNX actually built, the TensorRT version and the GPU. A stage whose part of the
record exists is skipped, so an interrupted `make all` or sweep picks up where it stopped.
CPU stages: calib, quantize, onnxrt (ONNX Runtime mAP of the FP32 / Q/DQ model). GPU stages: engine, bench, accuracy.
Usage: python -m tools.pipeline STAGES RECIPE...   (STAGES: comma-separated, or all / cpu / gpu)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tools.common import REPO, UserError, run_main, sha256_file, write_json
from tools.recipe import Recipe, digest, load
from tools.trt_plan import Plan, detect_version, plan

STAGES = ("calib", "quantize", "onnxrt", "engine", "bench", "accuracy")
CPU_STAGES = ("calib", "quantize", "onnxrt")
STAGE_SETS = {"all": STAGES, "cpu": CPU_STAGES, "gpu": ("engine", "bench", "accuracy")}


def have_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401

        return True
    except ImportError:
        return False


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        return out[0].strip() if out else "unknown GPU"
    except (OSError, subprocess.SubprocessError):
        return "unknown GPU"


def default_trtexec() -> tuple[str, ...]:
    return ("trtexec",) if shutil.which("trtexec") else (sys.executable, "-m", "tools.trtexec_py")


@dataclass(frozen=True)
class Setup:
    calib_dir: Path
    eval_dir: Path
    root: Path = REPO
    trt_version: str | None = None  # None: the installed TensorRT
    trtexec: tuple[str, ...] = field(default_factory=default_trtexec)
    polygraphy: tuple[str, ...] | None = None
    cuda_graphs: tuple[bool, ...] = (False, True)
    warmup_ms: int = 500
    duration_s: float = 3.0
    eval_limit: int | None = None
    calib_images: int | None = None  # overrides the recipes' calib_images
    compare_images: int = 4  # real images for the Polygraphy comparison; 0 skips it
    prep_cache: dict = field(default_factory=dict, compare=False, repr=False)  # preprocessed eval images

    def version(self) -> str:
        """The TensorRT to plan for: the one given, else the installed one, else trt_plan's default."""
        return self.trt_version or detect_version()


# ----------------------------------------------------------------------------------------------------------------
def source_onnx(recipe: Recipe, p: Plan, setup: Setup) -> Path:
    """The ONNX this recipe's engine is built from on this TensorRT (quantized or converted as the plan says)."""
    if p.onnx_kind == "qdq":
        from tools.quantize import quantize

        return quantize(recipe, setup.version(), setup.calib_dir, setup.eval_dir, setup.root)
    if p.onnx_kind == "autocast-fp16":
        return autocast_fp16(recipe, setup)
    if not recipe.onnx_path.is_file():
        raise UserError(f"{recipe.onnx_path}: no such ONNX model; run `make export` or set `onnx:` in the recipe")
    return recipe.onnx_path


def autocast_fp16(recipe: Recipe, setup: Setup) -> Path:
    """TensorRT 11 has no --fp16: bake FP16 into the ONNX with ModelOpt AutoCast (as Ultralytics 8.4 does). AutoCast
    keeps in FP32 the nodes whose activations overflow FP16, judged on one real calibration image (its default
    random input fails on a dynamic-shape model); the model keeps FP32 inputs and outputs."""
    from tools.calib import build_calibration
    from tools.common import atomic_path
    from tools.engine import run_logged
    from tools.quantize import model_digest

    root = setup.root
    out = root / "models" / recipe.model / "quant" / f"{recipe.model}.autocast-fp16.{model_digest(recipe.onnx_path)}.onnx"
    if out.is_file():
        return out
    image = root / "calib" / recipe.model / f"autocast-{recipe.imgsz}-n1.npz"  # AutoCast reads .npz keyed by input
    if not image.is_file():
        build_calibration(setup.calib_dir, image.with_suffix(".npy"), 1, 0, recipe.imgsz, setup.eval_dir)
        with atomic_path(image) as tmp:
            np.savez(tmp, images=np.load(image.with_suffix(".npy")))
    log = root / "logs" / recipe.model / f"{out.stem}.log"
    with atomic_path(out) as tmp:
        cmd = [sys.executable, "-m", "modelopt.onnx.autocast", "--onnx_path", str(recipe.onnx_path),
               "--output_path", str(tmp), "--low_precision_type", "fp16", "--calibration_data", str(image),
               "--keep_io_types"]
        rc, _ = run_logged(cmd, log)
        if rc != 0 or not tmp.stat().st_size:
            raise UserError(f"{log}: ModelOpt AutoCast failed (exit {rc}); read the log's last lines")
    return out


@dataclass
class Point:
    """One recipe on one TensorRT + GPU: where its artifacts live and what is known of it so far."""
    recipe: Recipe
    plan: Plan
    onnx: Path
    key: str
    record_path: Path
    record: dict

    @property
    def stem(self) -> str:
        return f"{self.recipe.name}.{self.key}"


def make_point(recipe: Recipe, setup: Setup) -> Point:
    version = setup.version()
    p = plan(recipe, version)
    onnx = source_onnx(recipe, p, setup)
    gpu = gpu_name()
    key = digest({"settings": recipe.settings(), "onnx": sha256_file(onnx), "trt": version, "gpu": gpu})
    record_path = setup.root / "results" / recipe.model / "points" / f"{recipe.name}.{key}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if not record:
        from tools.recipe import to_dict

        qjson = onnx.with_suffix(".json")
        record = {"name": recipe.name, "key": key, "model": recipe.model, "precision": recipe.precision,
                  "recipe": to_dict(recipe), "trt_version": version, "gpu": gpu,
                  "plan": {"onnx_kind": p.onnx_kind, "flags": list(p.precision_flags), "notes": list(p.notes)},
                  "onnx": str(onnx.relative_to(setup.root)) if onnx.is_relative_to(setup.root) else str(onnx),
                  "quantization": json.loads(qjson.read_text()) if p.onnx_kind == "qdq" and qjson.is_file() else None}
    return Point(recipe, p, onnx, key, record_path, record)


def save(point: Point) -> None:
    write_json(point.record_path, point.record)


def stage_engine(point: Point, setup: Setup) -> None:
    from tools.engine import build
    from tools.trtlog import parse_file

    r, root = point.recipe, setup.root
    engine = root / "engines" / r.model / f"{point.stem}.engine"
    log = root / "logs" / r.model / f"{point.stem}.build.log"
    cache = None
    if r.timing_cache:  # TensorRT refuses a cache from another precision or level: one cache per combination
        cache_key = digest([point.record["trt_version"], point.record["gpu"], point.plan.precision_flags,
                            r.builder_optimization_level])
        cache = root / "engines" / r.model / f"timing-{cache_key}.cache"
    calib_cache = implicit_calibration(point, setup) if point.plan.implicit_calibration else None
    if not engine.is_file():
        build(r, point.plan, list(setup.trtexec), point.onnx, engine, log, cache, calib_cache)
    parsed = parse_file(log)
    point.record["build"] = {"engine": str(engine.relative_to(root)), "log": str(log.relative_to(root)),
                             "build_s": parsed.get("build_s"), "engine_mb": round(engine.stat().st_size / 1e6, 3),
                             "fallback": parsed["fallback"], "timing_cache": bool(cache)}


def implicit_calibration(point: Point, setup: Setup) -> Path:
    from tools.calib import build_calibration
    from tools.implicit_calib import calibration_cache
    from tools.quantize import calibration_name, model_digest

    r = point.recipe
    npy = calibration_name(r, setup.calib_dir, setup.root)
    cache = npy.with_name(f"{npy.stem}.implicit-{r.implicit_calibrator}-{point.record['trt_version']}-"
                          f"{model_digest(point.onnx)}.cache")
    if not cache.is_file():
        if not npy.is_file():
            build_calibration(setup.calib_dir, npy, r.calib_images, r.calib_seed, r.imgsz, setup.eval_dir)
        t0 = time.perf_counter()
        calibration_cache(point.onnx, npy, cache, r.implicit_calibrator)
        print(f"  TensorRT {r.implicit_calibrator} calibration on {r.calib_images} images: "
              f"{time.perf_counter() - t0:.0f} s")
    point.record["implicit_calibration"] = {"algorithm": r.implicit_calibrator, "images": r.calib_images,
                                            "cache": str(cache.relative_to(setup.root))}
    return cache


def missing_timings(point: Point, setup: Setup) -> list[tuple[int, bool]]:
    """(batch, CUDA graph) runs this setup asks for that the record lacks: timings are kept per run, so a sweep
    (CUDA graphs only) and `make bench` (with and without) share a reference's engine and add only what is new."""
    have = {(b["batch"], b["cuda_graph"]) for b in point.record.get("bench", [])}
    return [(b, g) for b in point.recipe.bench_batches for g in setup.cuda_graphs if (b, g) not in have]


def stage_bench(point: Point, setup: Setup) -> None:
    from tools.bench import bench

    engine = setup.root / point.record["build"]["engine"]
    prefix = setup.root / "logs" / point.recipe.model / point.stem
    rows = point.record.get("bench", [])
    for batch, graph in missing_timings(point, setup):
        new = bench(engine, list(setup.trtexec), prefix, [batch], point.recipe.imgsz, (graph,), setup.warmup_ms,
                    setup.duration_s)
        rows += [{**row, "duration_s": setup.duration_s, "log": str(Path(row["log"]).relative_to(setup.root))}
                 for row in new]
    point.record["bench"] = sorted(rows, key=lambda r: (r["batch"], r["cuda_graph"]))


def stage_accuracy(point: Point, setup: Setup) -> None:
    from tools.compare import compare
    from tools.evaluate import evaluate

    engine = setup.root / point.record["build"]["engine"]
    if "accuracy" not in point.record:
        acc = evaluate(engine, setup.eval_dir, batch=min(32, point.recipe.max_batch), imgsz=point.recipe.imgsz,
                       limit=setup.eval_limit, prep_cache=setup.prep_cache)
        point.record["accuracy"] = {k: acc[k] for k in ("images", "map50_95", "map50", "exact", "image_dir") if k in acc}
    if not setup.compare_images or "compare" in point.record:
        return
    work = setup.root / "logs" / point.recipe.model / "compare"
    point.record["compare"] = compare(engine, point.recipe.onnx_path, setup.eval_dir, work, setup.compare_images,
                                      polygraphy=list(setup.polygraphy) if setup.polygraphy else None,
                                      imgsz=point.recipe.imgsz)


STAGE_FUNCS = {"engine": stage_engine, "bench": stage_bench, "accuracy": stage_accuracy}
STAGE_KEYS = {"engine": "build", "bench": "bench", "accuracy": "accuracy"}


def has_all_stages(record: dict | None) -> bool:
    """Whether a point's record holds the result of every GPU stage (what the result tables are built from)."""
    return bool(record) and all(key in record for key in STAGE_KEYS.values())


def stage_done(stage: str, point: Point, setup: Setup) -> bool:
    if stage == "bench":
        return "bench" in point.record and not missing_timings(point, setup)
    if stage == "accuracy":
        return "accuracy" in point.record and (not setup.compare_images or "compare" in point.record)
    return STAGE_KEYS[stage] in point.record


def onnxrt_accuracy(recipe: Recipe, setup: Setup) -> dict:
    """COCO mAP of the ONNX this recipe starts from (FP32, or its Q/DQ model) in ONNX Runtime; cached by content."""
    from tools.evaluate import evaluate

    p = plan(recipe, setup.version())
    onnx = source_onnx(recipe, p, setup) if p.onnx_kind == "qdq" else recipe.onnx_path
    kind = "fp32" if onnx == recipe.onnx_path else recipe.name
    key = digest({"onnx": sha256_file(onnx), "eval": str(setup.eval_dir), "limit": setup.eval_limit})
    out = setup.root / "results" / recipe.model / "onnxrt" / f"{kind}.{key}.json"
    if out.is_file():
        return json.loads(out.read_text())
    res = evaluate(onnx, setup.eval_dir, limit=setup.eval_limit, batch=8)
    res.update(kind=kind, onnx=str(onnx.relative_to(setup.root)) if onnx.is_relative_to(setup.root) else str(onnx))
    write_json(out, res)
    return res


def run_cpu_stages(recipe: Recipe, setup: Setup, stages, log=print) -> None:
    from tools.quantize import calibration_npy, quantize

    version = setup.version()
    if "calib" in stages and recipe.calibrated:
        log(f"  {recipe.name}: calibration tensor {calibration_npy(recipe, setup.calib_dir, setup.eval_dir, setup.root)}")
    if "quantize" in stages and recipe.quantized:
        quantize(recipe, version, setup.calib_dir, setup.eval_dir, setup.root)
    if "onnxrt" in stages and recipe.precision != "int8-implicit":
        res = onnxrt_accuracy(recipe, setup)
        log(f"  {recipe.name}: ONNX Runtime {res['kind']} mAP50-95 {res['map50_95']:.4f} ({res['images']} images)")


def run_recipe(recipe: Recipe, setup: Setup, stages=STAGES, log=print) -> dict | None:
    """Run `stages` of one recipe; returns its engine record (None when only CPU stages ran)."""
    if setup.calib_images and recipe.calibrated:
        recipe = recipe.replace(calib_images=setup.calib_images)
    run_cpu_stages(recipe, setup, [s for s in stages if s in CPU_STAGES], log)
    if not set(stages) - set(CPU_STAGES):
        return None
    point = make_point(recipe, setup)
    for stage in ("engine", "bench", "accuracy"):
        if stage not in stages or stage_done(stage, point, setup):
            continue
        if stage != "engine" and STAGE_KEYS["engine"] not in point.record:
            raise UserError(f"recipe {recipe.name!r}: no engine yet for stage {stage}; run the engine stage first")
        t0 = time.perf_counter()
        STAGE_FUNCS[stage](point, setup)
        point.record.setdefault("measured_utc", {})[stage] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        spent = point.record.setdefault("stage_seconds", {})
        spent[stage] = round(spent.get(stage, 0) + time.perf_counter() - t0, 1)
        save(point)
        log(f"  {recipe.name}: {stage} done in {time.perf_counter() - t0:.0f} s")
    return point.record


def parse_stages(text: str) -> tuple[str, ...]:
    if text in STAGE_SETS:
        return STAGE_SETS[text]
    stages = tuple(s for s in text.split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(f"unknown stage {bad[0]!r}; stages are {', '.join(STAGES)} or {', '.join(STAGE_SETS)}")
    return stages


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The flags every driver (pipeline, sweep) shares, each spelled once and mapped onto Setup."""
    ap.add_argument("--calib-dir", default=str(REPO / "calib" / "images"), help="calibration images")
    ap.add_argument("--eval-dir", default=str(REPO / "data" / "coco-mini"), help="evaluation images + annotations")
    ap.add_argument("--trt", help="TensorRT version (default: the installed one; 10 when planning without it)")
    ap.add_argument("--trtexec", help="trtexec command (default: trtexec if on PATH, else python -m tools.trtexec_py)")
    ap.add_argument("--polygraphy", help="polygraphy command (default: polygraphy, else python -m tools.polygraphy_cli)")
    ap.add_argument("--no-graphs", action="store_true", help="time without CUDA graphs only")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds timed per (batch, graph) run")
    ap.add_argument("--warmup-ms", type=int, default=500)
    ap.add_argument("--eval-limit", type=int, help="score only the first N evaluation images")
    ap.add_argument("--calib-images", type=int, help="override every recipe's calib_images (e.g. for a small folder)")


def setup_from_args(args) -> Setup:
    return Setup(calib_dir=Path(args.calib_dir), eval_dir=Path(args.eval_dir), trt_version=args.trt,
                 trtexec=tuple(shlex.split(args.trtexec)) if args.trtexec else default_trtexec(),
                 polygraphy=tuple(shlex.split(args.polygraphy)) if args.polygraphy else None,
                 cuda_graphs=(False,) if args.no_graphs else (False, True), warmup_ms=args.warmup_ms,
                 duration_s=args.duration, eval_limit=args.eval_limit, calib_images=args.calib_images)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.pipeline", description=__doc__)
    ap.add_argument("stages", help="comma-separated stages, or all / cpu / gpu")
    ap.add_argument("recipes", nargs="+")
    add_setup_args(ap)
    args = ap.parse_args(argv)
    stages = parse_stages(args.stages)
    setup = setup_from_args(args)
    gpu_stages = [s for s in stages if s not in CPU_STAGES]
    if gpu_stages and not have_tensorrt():
        print(f"skipped {', '.join(gpu_stages)}: TensorRT is not installed here (python -c 'import tensorrt' fails)")
        stages = tuple(s for s in stages if s in CPU_STAGES)
        if not stages:
            return
    failed = []
    for path in args.recipes:  # like make -k: one recipe's failure does not stop the others
        recipe = load(path)
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
