"""Map a recipe's precision onto the TensorRT version at hand: which ONNX to build, which trtexec flags.

TensorRT 8.6 (our GPU machine): builder flags; ModelOpt Q/DQ models must keep FP32 high precision (8.6 misreads
FP16 scales). TensorRT 10 (users): builder flags; takes FP32 or FP16 high precision. TensorRT 11: strongly typed
only, so FP16 must be baked into the ONNX (ModelOpt AutoCast or --high_precision_dtype fp16), engines are built
with --stronglyTyped, and implicit INT8 calibration and per-layer precision flags no longer exist.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from tools.core.cli import add_model, add_trt, detect_version
from tools.core.errors import UserError, run_main
from tools.core.recipe import Recipe, load

@dataclass(frozen=True)
class Plan:
    trt_major: int
    onnx_kind: str  # "fp32" (the model as exported) | "autocast-fp16" | "qdq"
    high_precision_dtype: str | None  # for ModelOpt, when onnx_kind == "qdq"
    precision_flags: tuple[str, ...]
    layer_precisions: bool  # may --precisionConstraints/--layerPrecisions be used
    implicit_calibration: bool
    notes: tuple[str, ...] = field(default=())


def trt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise UserError(f"TensorRT version {version!r} is not a version; pass e.g. TRT_VERSION=10.13") from None


def plan(recipe: Recipe, version: str) -> Plan:
    major = trt_major(version)
    if major < 8:
        raise UserError(f"TensorRT {version}: too old (needs 8.6 or newer for --builderOptimizationLevel)")
    strongly_typed = major >= 11
    notes = []
    if strongly_typed and not recipe.float_io:
        notes.append("TensorRT 11 is strongly typed: input_io_format/output_io_format ignored, the ONNX's own I/O "
                     "types apply (float32 here)")
    if recipe.precision == "fp16":
        if strongly_typed:
            return Plan(major, "autocast-fp16", None, ("--stronglyTyped",), False, False,
                        ("TensorRT 11: FP16 baked into the ONNX with ModelOpt AutoCast, built strongly typed", *notes))
        return Plan(major, "fp32", None, ("--fp16",), True, False, tuple(notes))
    if recipe.precision == "int8-implicit":
        if strongly_typed:
            raise UserError(f"recipe {recipe.name!r}: int8-implicit needs TensorRT <= 10 (TensorRT {version} has no "
                            f"implicit INT8); use the int8-ultralytics or int8-qdq recipe")
        return Plan(major, "fp32", None, ("--fp16", "--int8"), True, True, tuple(notes))
    # int8-qdq
    dtype = recipe.high_precision_dtype
    if major == 8 and dtype != "fp32":
        notes.append("TensorRT 8.6 misreads FP16 Q/DQ scales: high_precision_dtype fp16 -> fp32")
        dtype = "fp32"
    if strongly_typed:
        if dtype != "fp16":
            notes.append("TensorRT 11 has no --fp16 flag: high_precision_dtype fp32 -> fp16 so that unquantized "
                         "layers still run in FP16")
        if recipe.layer_precisions:
            notes.append("TensorRT 11 is strongly typed: layer_precisions ignored (exclude the nodes in ModelOpt)")
        return Plan(major, "qdq", "fp16", ("--stronglyTyped",), False, False, tuple(notes))
    return Plan(major, "qdq", dtype, ("--fp16", "--int8"), True, False, tuple(notes))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.trt_plan", description=__doc__)
    ap.add_argument("recipe", nargs="?", help="recipe YAML; without one, print the TensorRT version in use")
    add_model(ap)
    add_trt(ap)
    args = ap.parse_args(argv)
    version = args.trt or detect_version()
    if not args.recipe:
        print(version)
        return
    p = plan(load(args.recipe, args.model), version)
    print(f"TensorRT {version}: build {p.onnx_kind} ONNX with {' '.join(p.precision_flags)}")
    for n in p.notes:
        print(f"  note: {n}")


if __name__ == "__main__":
    run_main(main)
