"""Recipe -> trtexec command line -> engine + build log.

Works with NVIDIA's trtexec or, where it is missing, with our fallback (`python -m tools.trtexec_py`), which takes
the same flags. Per-layer precisions are resolved from the recipe's regexes against the ONNX graph's node names
(TensorRT's ONNX parser names each layer after its node) into --layerPrecisions/--layerOutputTypes.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import onnx

from tools.core.cli import add_model, add_trt, add_trtexec, default_trtexec, detect_version
from tools.core.errors import UserError, run_main
from tools.core.files import atomic_path, run_logged
from tools.core.recipe import FLOAT_IO, Profile, Recipe, load
from tools.trt_plan import Plan, plan
from tools.trtexec_py import AVG_TIMING

INPUT = "images"
NO_LIBRARY_TACTICS = "-CUBLAS,-CUBLAS_LT,-CUDNN"


def onnx_nodes(onnx_path) -> list[tuple[str, str]]:
    """(name, op_type) of every node, read without weights."""

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ... for a damaged file
        raise UserError(f"{onnx_path}: not a readable ONNX model ({type(e).__name__}); re-export it") from None
    return [(n.name, n.op_type) for n in model.graph.node]


def resolve_layer_precisions(recipe: Recipe, nodes) -> dict[str, str]:
    """Recipe rules -> {layer name: precision}; a rule that matches nothing is an error (a typo would be silent)."""
    chosen = {}
    for rule in recipe.layer_precisions:
        pattern = re.compile(rule.match)
        hits = [n for n, op in nodes if pattern.search(n) and (rule.op_type is None or op == rule.op_type)]
        if not hits:
            raise UserError(f"recipe {recipe.name!r}: layer_precisions rule {rule.match!r} (op {rule.op_type}) "
                            f"matches no node of the model; fix the regex")
        chosen.update({n: rule.precision for n in hits})
    return chosen


def input_layout(recipe: Recipe) -> str:
    """nchw, or what an end-to-end engine (recipe key `deploy`) takes."""
    return recipe.deploy.layout if recipe.deploy else "nchw"


def shape(batch: int, imgsz: int, layout: str = "nchw") -> str:
    return f"{INPUT}:{batch}x{imgsz}x{imgsz}x3" if layout == "nhwc" else f"{INPUT}:{batch}x3x{imgsz}x{imgsz}"


def shape_args(profile: Profile, imgsz: int, layout: str = "nchw") -> list[str]:
    """trtexec's optimization-profile flags: the engine is built for exactly these batch sizes."""
    return [f"--minShapes={shape(profile.min, imgsz, layout)}", f"--optShapes={shape(profile.opt, imgsz, layout)}",
            f"--maxShapes={shape(profile.max, imgsz, layout)}"]


def io_format_args(recipe: Recipe, p: Plan) -> list[str]:
    """trtexec's I/O format flags for the recipe's input_io_format / output_io_format (off fp32:chw only). TensorRT 11
    builds strongly typed, where the ONNX's own I/O types apply (trt_plan notes it): no flags there."""
    if p.trt_major >= 11:
        return []
    return [f"--{flag}={value}" for flag, value in (("inputIOFormats", recipe.input_io_format),
                                                   ("outputIOFormats", recipe.output_io_format))
            if value != FLOAT_IO]


def build_args(recipe: Recipe, profile: str, p: Plan, onnx_path, engine_path, timing_cache=None, calib_cache=None,
               layer_precisions: dict[str, str] | None = None) -> list[str]:
    """trtexec flags for building one engine of this recipe: the named deployment profile's shapes, the plan's precision
    flags, the builder level and trtexec's tactic-timing average (given explicitly: see AVG_TIMING). Detailed
    profiling verbosity costs no speed and lets `make profile` read every layer's precision and tactic from the
    engine."""
    args = [f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            *shape_args(recipe.profiles[profile], recipe.imgsz, input_layout(recipe)),
            *p.precision_flags, f"--builderOptimizationLevel={recipe.builder_optimization_level}",
            f"--avgTiming={AVG_TIMING}", "--profilingVerbosity=detailed", *io_format_args(recipe, p)]
    if p.implicit_calibration:
        if calib_cache is None:
            raise UserError(f"recipe {recipe.name!r}: int8-implicit needs a calibration cache; run its calib step")
        args.append(f"--calib={calib_cache}")
    if layer_precisions and p.layer_precisions:
        spec = ",".join(f"{name}:{prec}" for name, prec in layer_precisions.items())
        args += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    if recipe.deploy and recipe.deploy.nms and p.trt_major < 10:
        # TensorRT 8.6 gives every plugin cuBLAS and cuDNN handles while those tactic sources are on, loading both
        # libraries (the devkit's stand-ins refuse the build: "SymbolAddress for cublasGetProperty"); EfficientNMS
        # uses neither, no layer of ours is timed with them, and TensorRT 10 turns them off by default
        args.append(f"--tacticSources={NO_LIBRARY_TACTICS}")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    args.append("--skipInference")
    return args


def build(recipe: Recipe, profile: str, p: Plan, trtexec: list[str], onnx_path, engine_path, log_path,
          timing_cache=None, calib_cache=None, env: dict | None = None) -> float:
    """Build the engine into `engine_path` (only whole engines land there); returns the wall time in seconds."""
    precisions = resolve_layer_precisions(recipe, onnx_nodes(onnx_path)) if p.layer_precisions else {}
    engine_path = Path(engine_path)
    with atomic_path(engine_path) as tmp_engine:
        cmd = trtexec + build_args(recipe, profile, p, onnx_path, tmp_engine, timing_cache, calib_cache, precisions)
        rc, seconds = run_logged(cmd, log_path, env)
        if rc != 0 or not tmp_engine.stat().st_size:
            raise UserError(f"{log_path}: engine build for recipe {recipe.name!r} failed (exit {rc}); "
                            f"read the log's last lines")
    return seconds


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.engine", description=__doc__)
    ap.add_argument("recipe")
    add_model(ap)
    ap.add_argument("--onnx", required=True, help="the ONNX to build (the quantized one for int8-qdq)")
    ap.add_argument("-o", "--engine", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--profile", help="the recipe's deployment profile to build (default: its first)")
    add_trt(ap)
    add_trtexec(ap)
    ap.add_argument("--timing-cache")
    ap.add_argument("--calib-cache")
    ap.add_argument("--print-only", action="store_true", help="print the trtexec command and exit")
    args = ap.parse_args(argv)
    recipe = load(args.recipe, args.model)
    profile = args.profile or next(iter(recipe.profiles))
    if profile not in recipe.profiles:
        raise UserError(f"{args.recipe}: has no profile {profile!r}; its profiles are {', '.join(recipe.profiles)}")
    p = plan(recipe, args.trt or detect_version())
    trtexec = shlex.split(args.trtexec) if args.trtexec else list(default_trtexec())
    if args.print_only:
        precisions = resolve_layer_precisions(recipe, onnx_nodes(args.onnx)) if p.layer_precisions else {}
        print(shlex.join(trtexec + build_args(recipe, profile, p, args.onnx, args.engine, args.timing_cache,
                                               args.calib_cache, precisions)))
        return
    seconds = build(recipe, profile, p, trtexec, args.onnx, args.engine, args.log, args.timing_cache, args.calib_cache)
    print(f"built {args.engine} in {seconds:.1f} s (log {args.log})")


if __name__ == "__main__":
    run_main(main)
