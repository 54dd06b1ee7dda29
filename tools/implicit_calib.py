"""TensorRT implicit-INT8 calibration cache (for int8-implicit recipes), written with Polygraphy's Calibrator.

TensorRT calibrates during a build; this build only produces the cache (its engine is thrown away), which
trtexec --calib=<cache> (or the fallback) then reads for the real build with the recipe's flags.
"""
from __future__ import annotations

import argparse

import numpy as np
from polygraphy.backend.trt import Calibrator, CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

from tools.core.errors import import_tensorrt, run_main
from tools.core.files import atomic_path


def calibration_cache(onnx_path, npy, out, algorithm: str = "minmax", batch: int = 8) -> None:
    trt = import_tensorrt("TensorRT's implicit INT8 calibration")

    data = np.load(npy, mmap_mode="r")
    size = data.shape[-1]

    if len(data) < batch:
        batch = len(data)

    def batches():  # TensorRT calibrates at the profile's opt shape: whole batches only
        for i in range(0, len(data) // batch * batch, batch):
            yield {"images": np.ascontiguousarray(data[i:i + batch])}

    base = trt.IInt8MinMaxCalibrator if algorithm == "minmax" else trt.IInt8EntropyCalibrator2
    with atomic_path(out) as tmp:
        calibrator = Calibrator(batches(), cache=str(tmp), BaseClass=base)
        shape = (batch, 3, size, size)
        profile = Profile().add("images", min=shape, opt=shape, max=shape)
        config = CreateConfig(int8=True, calibrator=calibrator, profiles=[profile], builder_optimization_level=0)
        EngineBytesFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config)()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.implicit_calib", description=__doc__)
    ap.add_argument("onnx")
    ap.add_argument("--calib", required=True, help="calibration tensor .npy (python -m tools.calib)")
    ap.add_argument("-o", "--output", required=True, help="calibration cache to write")
    ap.add_argument("--algorithm", choices=("minmax", "entropy"), default="minmax")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    calibration_cache(args.onnx, args.calib, args.output, args.algorithm, args.batch)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_main(main)
