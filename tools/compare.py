"""Polygraphy accuracy check: a TensorRT engine against ONNX Runtime FP32 on real images.

Runs the two commands a Polygraphy user would (both are logged):
  polygraphy run MODEL.onnx --onnxrt --load-inputs inputs.json --save-outputs ref.json
  polygraphy run ENGINE --model-type engine --trt --load-inputs inputs.json --load-outputs ref.json --atol A --rtol R
and reports Polygraphy's verdict, its minimum required tolerances and its error statistics.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from polygraphy.json import save_json

from tools.core.cli import add_polygraphy, positive_int
from tools.core.errors import UserError, run_main
from tools.core.files import atomic_path, list_images, write_json
from tools.yolo.preprocess import preprocess, to_input


def default_polygraphy() -> list[str]:
    return ["polygraphy"] if shutil.which("polygraphy") else [sys.executable, "-m", "tools.polygraphy_cli"]


def write_inputs(image_dir, out, count: int, imgsz: int = 640) -> list[str]:
    """Polygraphy --load-inputs file: one feed dict per image, batch 1, real letterboxed images."""

    files = list_images(image_dir)[:count]
    feeds = [{"images": to_input(preprocess(p, imgsz)[0][None])} for p in files]
    with atomic_path(out) as tmp:
        save_json(feeds, str(tmp))
    return [p.name for p in files]


def parse_report(text: str) -> dict:
    """Polygraphy's comparison printout -> worst-case tolerances and absolute-error stats over all iterations."""
    required = re.findall(r"Minimum Required Tolerance: \w+ error \| \[abs=([\d.eE+-]+|inf)\] OR \[rel=([\d.eE+-]+|inf)\]",
                          text)
    abs_req, rel_req = [float(a) for a, _ in required], [float(r) for _, r in required]
    abs_stats = re.findall(r"Absolute Difference \| Stats: mean=([\d.eE+-]+).*?median=([\d.eE+-]+).*?max=([\d.eE+-]+)",
                           text)
    out = {"passed": bool(re.search(r"PASSED \| Runtime", text)) and "FAILED" not in text}
    if abs_req:
        out["min_required_atol"] = max(abs_req)
    if rel_req:
        out["min_required_rtol"] = max(rel_req)
    if abs_stats:
        arr = np.array(abs_stats, dtype=float)
        out.update(abs_err_mean=float(arr[:, 0].mean()), abs_err_median=float(np.median(arr[:, 1])),
                   abs_err_max=float(arr[:, 2].max()))
    return out


def run_logged_text(cmd: list[str], log) -> tuple[int, str]:
    try:
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]}: no such command; install Polygraphy or name another with --polygraphy "
                        f"(make: POLYGRAPHY=), e.g. 'python -m tools.polygraphy_cli'") from None
    with atomic_path(log) as tmp:
        tmp.write_text(f"# {shlex.join(cmd)}\n{res.stdout}")
    return res.returncode, res.stdout


def compare(engine, onnx_model, image_dir, work_dir, count=4, atol=0.5, rtol=0.05, polygraphy=None, imgsz=640,
            reference=None) -> dict:
    """`reference`: the ONNX Runtime outputs of an earlier call on the same images (reused: one per model)."""
    # Polygraphy's inputs and ONNX Runtime outputs are tens of MB: write them only for a comparison that can run
    if not Path(engine).is_file():
        raise UserError(f"{engine}: no such engine; build it first (make engine)")
    if not Path(onnx_model).is_file():
        raise UserError(f"{onnx_model}: no such ONNX model; pass the FP32 model to --onnx")
    polygraphy = polygraphy or default_polygraphy()
    work_dir = Path(work_dir)
    inputs = work_dir / f"inputs-{count}.json"
    if not inputs.is_file():
        write_inputs(image_dir, inputs, count, imgsz)
    ref = Path(reference) if reference else work_dir / f"{Path(onnx_model).stem}.onnxrt-{count}.json"
    if not ref.is_file():
        with atomic_path(ref) as tmp:
            rc, text = run_logged_text(polygraphy + ["run", str(onnx_model), "--onnxrt", "--load-inputs", str(inputs),
                                                     "--save-outputs", str(tmp)], ref.with_suffix(".log"))
            if rc != 0:
                raise UserError(f"{ref.with_suffix('.log')}: polygraphy run with ONNX Runtime failed; read the log")
    log = work_dir / f"{Path(engine).stem}.compare.log"
    rc, text = run_logged_text(polygraphy + ["run", str(engine), "--model-type", "engine", "--trt", "--load-inputs",
                                             str(inputs), "--load-outputs", str(ref), "--atol", str(atol), "--rtol",
                                             str(rtol), "--check-error-stat", "mean"], log)
    report = parse_report(text)
    if "min_required_atol" not in report:
        raise UserError(f"{log}: polygraphy printed no comparison (exit {rc}); read the log")
    return {"images": count, "atol": atol, "rtol": rtol, "check_error_stat": "mean", "log": str(log), **report}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__)
    ap.add_argument("engine")
    ap.add_argument("--onnx", required=True, help="FP32 ONNX reference")
    ap.add_argument("--images", required=True)
    ap.add_argument("-n", "--count", type=positive_int, default=4)
    ap.add_argument("--atol", type=float, default=0.5)
    ap.add_argument("--rtol", type=float, default=0.05)
    ap.add_argument("--work-dir", default="logs/compare")
    add_polygraphy(ap)
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    res = compare(args.engine, args.onnx, args.images, args.work_dir, args.count, args.atol, args.rtol,
                  shlex.split(args.polygraphy) if args.polygraphy else None)
    if args.output:
        write_json(args.output, res)
    print(f"{'PASSED' if res['passed'] else 'FAILED'}: min required atol {res['min_required_atol']:.4g}, "
          f"mean abs error {res.get('abs_err_mean', float('nan')):.4g}")


if __name__ == "__main__":
    run_main(main)
