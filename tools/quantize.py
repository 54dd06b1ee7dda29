"""ModelOpt ONNX PTQ (INT8 Q/DQ) of a recipe, through the `modelopt.onnx.quantization` CLI.

Two ModelOpt runs, both logged with their exact command:
1. calibrate: quantize everything on the calibration tensor and keep the activation scales as a TensorRT-format
   calibration cache. Scales depend only on the float model, the images and the method, so one cache serves
   every exclusion set (the expensive part runs once per method x image count, not once per sweep point).
   The histogram methods (mse, percentile: tools/yolo/calibrators.py) write that cache themselves, for the tensors of
   ModelOpt's max cache on the same images.
2. quantize: apply the recipe (exclusions, high-precision dtype) with `--calibration_cache_path`.
A JSON beside the model records the settings, the ModelOpt version, both commands and the node counts. An FP16
flavour (high precision fp16) has its subnormal weight scales raised to FP16's smallest normal (tools/yolo/qdq_fp16.py).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
from onnx import numpy_helper

from tools.calib import build_calibration, check_calibration, select_images
from tools.core.cli import add_calib_dir, add_eval_dir, add_model, add_trt, detect_version
from tools.core.errors import UserError, run_main
from tools.core.files import REPO, digest, file_digest, list_images, write_json, write_text
from tools.core.layout import Layout
from tools.core.recipe import Recipe, load
from tools.core.record import read_json
from tools.engine import onnx_nodes, run_logged
from tools.trt_plan import plan
from tools.yolo.calibrators import HISTOGRAM_METHODS, collect, fixed_amax, histogram_scales, load_histograms, \
    save_histograms, scale_groups
from tools.yolo.graph_rewrites import rewritten
from tools.yolo.qdq_fp16 import clamp_weight_scales
from tools.yolo.qdq_rules import apply

MODELOPT = [sys.executable, "-m", "modelopt.onnx.quantization"]


def model_digest(onnx_path) -> str:
    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX model; export one there (make export PT=yolo11n.pt ONNX={path}) or "
                        f"point the recipe's onnx: key at your model")
    return file_digest(path)[:12]


def calibration_name(recipe: Recipe, calib_dir, root: Path) -> Path:
    """Where the recipe's calibration tensor lives, named by the chosen images' content (no collision across
    folders); cheap: only hashes the chosen files."""
    files = select_images(list_images(calib_dir), recipe.calib_images, recipe.calib_seed)
    set_digest = digest([file_digest(p) for p in files])
    return Layout(recipe.model, root).calib_tensor(recipe.imgsz, recipe.calib_images, recipe.calib_seed, set_digest)


def calibration_npy(recipe: Recipe, calib_dir, eval_dir, root: Path) -> Path:
    out = calibration_name(recipe, calib_dir, root)
    if not out.is_file():
        build_calibration(calib_dir, out, recipe.calib_images, recipe.calib_seed, recipe.imgsz, eval_dir)
    return out


def activation_scales(qdq_onnx) -> dict[str, float]:
    """{activation tensor: scale} of every QuantizeLinear whose input is not a weight."""
    model = onnx.load(str(qdq_onnx))
    inits = {i.name: i for i in model.graph.initializer}
    scales = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scales[node.input[0]] = float(numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])
    return scales


def cache_text(scales: dict[str, float], method: str) -> str:
    """TensorRT calibration-cache text: a header line, then `tensor: big-endian float32 scale in hex`."""
    header = "TRT-8601-EntropyCalibration2" if method == "entropy" else "TRT-8601-MinMaxCalibration"
    return header + "\n" + "".join(f"{k}: {struct.pack('!f', v).hex()}\n" for k, v in sorted(scales.items()))


def read_cache(path) -> dict[str, float]:
    """{tensor: scale} of a TensorRT calibration cache (the inverse of cache_text; the header line is skipped)."""
    scales = {}
    for n, line in enumerate(Path(path).read_text().splitlines()[1:], start=2):
        name, sep, value = line.rpartition(": ")
        try:
            scales[name] = struct.unpack("!f", bytes.fromhex(value))[0]
        except (ValueError, struct.error):
            raise UserError(f"{path}:{n}: not a `tensor: hex float32` calibration-cache line; delete the cache "
                            f"so that it is made again") from None
        if not sep:
            raise UserError(f"{path}:{n}: no `tensor: ` before the scale; delete the cache so that it is made again")
    return scales


def calibration_label(recipe: Recipe) -> str:
    """The calibration as cache names spell it: a percentile names its value, since each value has its own scales."""
    if recipe.calibration_method == "percentile":
        return f"percentile{recipe.calibration_percentile:g}"
    return recipe.calibration_method


def modelopt_method(method: str) -> str:
    """What ModelOpt's --calibration_method gets when it reads a cache: it knows entropy and max only, and with a cache
    its own calibration only places the Q/DQ nodes (the cache's scales replace its numbers), so the histogram methods
    pass the cheaper max."""
    return "max" if method in HISTOGRAM_METHODS else method


@contextlib.contextmanager
def modelopt_scratch(onnx_path, output: Path):
    """ModelOpt rewrites its input ONNX in place (shape inference) and leaves intermediates beside its input and
    output: one SIGTERM mid-run left the committed model at 0 bytes. So it only ever sees a private copy, in a
    scratch folder beside `output` (same file system: the result moves into place by a rename) that goes away
    however the run ends. Yields (the copy to pass as --onnx_path, the --output_path to give)."""
    if not onnx_nodes(onnx_path):  # ModelOpt takes a while to fail on what is no model; 0 bytes parse as no graph
        raise UserError(f"{onnx_path}: holds no ONNX graph; export the model again (make export PT=yolo11n.pt "
                        f"ONNX={onnx_path})")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as scratch:
        copy = Path(scratch) / "input" / Path(onnx_path).name
        copy.parent.mkdir()
        shutil.copyfile(onnx_path, copy)
        yield copy, Path(scratch) / output.name


def calibrate(recipe: Recipe, calib_dir, eval_dir, root: Path) -> Path:
    """Calibrate once per (model, images, method): ModelOpt's entropy or max, or our histogram methods (built on
    ModelOpt's max cache of the same images); returns the calibration cache."""
    npy = calibration_name(recipe, calib_dir, root)
    cache = npy.with_name(f"{npy.stem}.{calibration_label(recipe)}-{model_digest(recipe.onnx_path)}.cache")
    if cache.is_file():
        return cache
    if recipe.calibration_method in HISTOGRAM_METHODS:
        return histogram_calibrate(recipe, cache, calib_dir, eval_dir, root)
    npy = calibration_npy(recipe, calib_dir, eval_dir, root)
    check_calibration(npy, recipe.imgsz)
    log = Layout(recipe.model, root).logs / f"{cache.stem}.calibrate.log"
    full = cache.with_suffix(".full.onnx")
    with modelopt_scratch(recipe.onnx_path, full) as (model, result):
        cmd = MODELOPT + ["--onnx_path", str(model), "--quantize_mode", "int8",
                          "--calibration_data_path", str(npy), "--calibration_method", recipe.calibration_method,
                          "--calibration_eps", *recipe.calibration_eps, "--high_precision_dtype", "fp32",
                          "--output_path", str(result)]
        rc, seconds = run_logged(cmd, log)
        if rc != 0 or not result.is_file():
            raise UserError(f"{log}: ModelOpt calibration failed (exit {rc}); read the log's last lines")
        os.replace(result, full)
    write_text(cache, cache_text(activation_scales(full), recipe.calibration_method))
    print(f"calibrated {recipe.calibration_method} on {npy.name} in {seconds:.0f} s -> {cache}")
    return cache


def histogram_calibrate(recipe: Recipe, cache: Path, calib_dir, eval_dir, root: Path) -> Path:
    """Write `cache` with mse or percentile scales. The tensors are those of ModelOpt's max cache on the same images;
    their histograms are collected once per (model, images) and kept beside the calibration tensor, so every
    histogram method and percentile after the first costs seconds."""
    start = time.time()
    tensors = read_cache(calibrate(recipe.replace(calibration_method="max"), calib_dir, eval_dir, root))
    model = onnx.load(str(recipe.onnx_path), load_external_data=False)
    groups = scale_groups(model, tensors)
    npy = calibration_npy(recipe, calib_dir, eval_dir, root)
    hist_path = npy.with_name(f"{npy.stem}.hist-{model_digest(recipe.onnx_path)}.npz")
    if hist_path.is_file():
        hists = load_histograms(hist_path)
    else:
        log = Layout(recipe.model, root).logs / f"{hist_path.stem}.calibrate.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            f.write(f"histograms of {len(tensors)} tensors ({len(set(groups.values()))} scale groups) of "
                    f"{recipe.onnx_path} over {npy}\n")
            hists = collect(recipe.onnx_path, npy, groups, log=lambda line: print(line, file=f, flush=True))
        save_histograms(hist_path, hists)
    scales = histogram_scales(hists, groups, recipe.calibration_method, recipe.calibration_percentile,
                              fixed_amax(model, tensors))
    write_text(cache, cache_text(scales, recipe.calibration_method))
    print(f"calibrated {calibration_label(recipe)} on {npy.name} in {time.time() - start:.0f} s -> {cache}")
    return cache


WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def node_counts(model) -> dict:
    """Q/DQ counts of a loaded Q/DQ model and the nodes that run in INT8: weighted ops whose input and weight both
    come through a DequantizeLinear, other compute ops whose every data input does."""
    ops = Counter(n.op_type for n in model.graph.node)
    inits = {i.name for i in model.graph.initializer}
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}

    def int8(n):
        if n.op_type in WEIGHTED_OPS:
            return len(n.input) > 1 and n.input[0] in dq_outputs and n.input[1] in dq_outputs
        data = [i for i in n.input if i and i not in inits]
        return n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Shape") and bool(data) and \
            all(i in dq_outputs for i in data)

    quantized = sorted(n.name for n in model.graph.node if int8(n))
    return {"QuantizeLinear": ops["QuantizeLinear"], "DequantizeLinear": ops["DequantizeLinear"],
            "nodes": sum(ops.values()), "quantized_nodes": len(quantized), "quantized": quantized,
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}


def finish_qdq_model(qdq_onnx, hp_dtype: str, rewrites=()) -> tuple[list[dict], dict[str, list[str]], dict]:
    """ModelOpt's output finished, in the file: the recipe's Q/DQ placement `rewrites` (tools/yolo/qdq_rules.py),
    value_info sorted by name (ModelOpt's FP16 conversion lists them in a different order from run to run, so two
    machines made different bytes of the same model), and for the FP16 flavour, subnormal weight scales raised to
    FP16's smallest normal (tools/yolo/qdq_fp16.py). Returns the scales raised, {rewrite: nodes it changed} and the
    finished model's node_counts."""
    model = onnx.load(str(qdq_onnx))
    rewritten_nodes = apply(model, rewrites)
    infos = sorted(model.graph.value_info, key=lambda v: v.name)
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)
    raised = clamp_weight_scales(model) if hp_dtype == "fp16" else []
    onnx.save(model, str(qdq_onnx))
    return raised, rewritten_nodes, node_counts(model)


def unmatched_exclusions(onnx_path, patterns) -> list[str]:
    """A warning for each nodes_to_exclude regex that matches no node (ModelOpt re.match-es node names and says
    nothing of a typo, so the node would be quantized after all), naming the node names nearest to it."""
    names = [name for name, _ in onnx_nodes(onnx_path)]
    return [f"nodes_to_exclude {p!r} matches no node of {onnx_path} (ModelOpt matches from the start of the name); "
            f"nearest: {', '.join(difflib.get_close_matches(p, names, n=3, cutoff=0))}"
            for p in patterns if not any(re.match(p, n) for n in names)]


def quantized_path(recipe: Recipe, hp_dtype: str, root: Path, calib_digest: str) -> Path:
    key = digest({**recipe.settings("quantize"), "high_precision_dtype": hp_dtype, "calib": calib_digest,
                  "model": model_digest(recipe.onnx_path)})
    return Layout(recipe.model, root).quantized_onnx(recipe.name, key)


def quantization_record(qdq_onnx) -> Path:
    """The JSON beside a Q/DQ model: its settings, the ModelOpt version, both commands and the node counts."""
    return Path(qdq_onnx).with_suffix(".json")


def quantize(recipe: Recipe, trt_version: str, calib_dir, eval_dir=None, root: Path | None = None) -> Path:
    """Quantize `recipe` for TensorRT `trt_version`; returns the Q/DQ model (reused when already made)."""
    root = root or REPO
    if not recipe.quantized:
        raise UserError(f"recipe {recipe.name!r}: precision {recipe.precision} has no ModelOpt step")
    hp_dtype = plan(recipe, trt_version).high_precision_dtype
    out = quantized_path(recipe, hp_dtype, root, calibration_name(recipe, calib_dir, root).stem)
    if out.is_file():
        return out
    if importlib.util.find_spec("modelopt") is None:
        raise UserError(f"{out}: not quantized yet and ModelOpt is not installed here; run `make quantize` on a "
                        f"machine with the CPU requirements and bring models/{recipe.model}/quant along")
    # the recipe's graph rewrites come first: ModelOpt calibrates and quantizes the rewritten model, whose own
    # calibration cache (keyed by its bytes) holds the scales of its tensors
    layout = Layout(recipe.model, root)
    source = rewritten(layout, recipe.onnx_path, recipe.graph_rewrites)
    work = recipe if source == recipe.onnx_path else recipe.replace(onnx=str(source))
    for warning in unmatched_exclusions(source, recipe.nodes_to_exclude):
        print(f"warning: recipe {recipe.name!r}: {warning}")
    cache = calibrate(work, calib_dir, eval_dir, root)
    log = layout.logs / f"{out.stem}.quantize.log"
    shape = f"images:1x3x{recipe.imgsz}x{recipe.imgsz}"
    with modelopt_scratch(source, out) as (model, result):
        cmd = MODELOPT + ["--onnx_path", str(model), "--quantize_mode", "int8",
                          "--calibration_cache_path", str(cache), "--calibration_shapes", shape,
                          "--calibration_method", modelopt_method(recipe.calibration_method),
                          "--calibration_eps", *recipe.calibration_eps, "--high_precision_dtype", hp_dtype,
                          "--output_path", str(result)]
        if recipe.nodes_to_exclude:
            cmd += ["--nodes_to_exclude", *recipe.nodes_to_exclude]
        if recipe.op_types_to_exclude:
            cmd += ["--op_types_to_exclude", *recipe.op_types_to_exclude]
        rc, seconds = run_logged(cmd, log)
        if rc != 0 or not result.is_file() or not result.stat().st_size:
            raise UserError(f"{log}: ModelOpt quantization of recipe {recipe.name!r} failed (exit {rc}); "
                            f"read the log's last lines")
        raised, rewritten_nodes, counts = finish_qdq_model(result, hp_dtype, recipe.qdq_rewrites)
        os.replace(result, out)
    import modelopt  # optional: only the CPU side has it (checked above before any work)

    command = " ".join(cmd[2:]).replace(str(model), str(source)).replace(str(result), str(out))
    write_json(quantization_record(out), {
        "recipe": recipe.name, "settings": recipe.settings("quantize"), "high_precision_dtype": hp_dtype,
        "trt_version_planned": trt_version, "modelopt_version": modelopt.__version__,
        "calibration_tensor": str(calibration_name(recipe, calib_dir, root).relative_to(root)), "calibration_cache": str(cache.relative_to(root)),
        "command": command.replace(f"{root}/", ""), "seconds": round(seconds, 1), "nodes": counts,
        "fp16_weight_scales_raised": raised, "qdq_rewrites": rewritten_nodes,
        **({"graph_rewrites": read_json(source.with_suffix(".json"), "graph-rewrite record")}
           if source != recipe.onnx_path else {})})
    print(f"quantized {recipe.name}: {counts['quantized_nodes']} nodes INT8 -> {out}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.quantize", description=__doc__)
    ap.add_argument("recipe")
    add_model(ap)
    add_calib_dir(ap)
    add_eval_dir(ap)
    add_trt(ap)
    args = ap.parse_args(argv)
    print(quantize(load(args.recipe, args.model), args.trt or detect_version(), args.calib_dir, args.eval_dir))


if __name__ == "__main__":
    run_main(main)
