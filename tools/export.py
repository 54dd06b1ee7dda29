"""Get a checked YOLO11 detection ONNX: export a `.pt` through ultralytics, or take an existing ONNX.

Either way the model is checked with onnx.checker and for the detector layout (input [N,3,H,W], output
[N,4+classes,anchors]); an exported model is also run in ONNX Runtime and compared with PyTorch.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tools.common import UserError, atomic_path, run_main


def dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def check_detector(onnx_path) -> dict:
    """onnx.checker plus the YOLO detector layout; returns {'input': dims, 'output': dims, 'classes': n}."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise UserError(f"{path}: no such ONNX model; export one (make export PT=yolo11n.pt) or copy it there")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # DecodeError, ValidationError, ...
        raise UserError(f"{path}: not a valid ONNX model ({type(e).__name__}); re-export it") from None
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise UserError(f"{path}: a YOLO detector has one input and one output, this has {len(inputs)} and "
                        f"{len(model.graph.output)}; pass a YOLO11 detection model exported without NMS")
    i, o = dims(inputs[0]), dims(model.graph.output[0])
    ok = len(i) == 4 and i[1] == 3 and len(o) == 3 and (not isinstance(o[1], int) or o[1] > 4)
    if not ok:
        raise UserError(f"{path}: input {i} / output {o} is not a YOLO detector's [N,3,H,W] -> [N,4+classes,anchors]; "
                        f"pass a YOLO11 detection ONNX (no NMS, no pose/segment head)")
    return {"input_name": inputs[0].name, "input": i, "output": o,
            "classes": o[1] - 4 if isinstance(o[1], int) else None, "opset": model.opset_import[0].version}


def export_pt(pt, out, imgsz=640, opset=17, dynamic=False) -> float:
    """ultralytics export of `pt` to `out`; returns the max |ONNX Runtime - PyTorch| on one input."""
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO

    if not Path(pt).is_file() and not str(pt).endswith(".yaml"):
        raise UserError(f"{pt}: no such checkpoint; pass a YOLO11 .pt (or a model .yaml for a random-weight model)")
    model = YOLO(str(pt))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(model.export(format="onnx", imgsz=imgsz, opset=opset, dynamic=dynamic, simplify=True,
                                project=tmp, device="cpu"))
        with atomic_path(out) as dst:
            shutil.copyfile(src, dst)
        if src.resolve() != Path(out).resolve():
            src.unlink()  # ultralytics writes beside the checkpoint (or into the working directory for a .yaml)
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    net = model.model.float().eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x))
    ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.abs(got - ref).max())


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__)
    ap.add_argument("--pt", help="YOLO11 .pt checkpoint (or ultralytics model .yaml) to export; omit to check --onnx")
    ap.add_argument("--onnx", required=True, help="ONNX to write (with --pt) or to check")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--dynamic", action="store_true", help="dynamic batch/height/width (default: static)")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max |ONNX Runtime - PyTorch| accepted")
    args = ap.parse_args(argv)
    if args.pt:
        err = export_pt(args.pt, args.onnx, args.imgsz, args.opset, args.dynamic)
        if err > args.tolerance:
            Path(args.onnx).unlink()
            raise UserError(f"{args.onnx}: ONNX Runtime differs from PyTorch by {err:.3g} (> {args.tolerance}); "
                            f"export with another --opset")
        print(f"exported {args.pt} -> {args.onnx} (ONNX Runtime vs PyTorch max abs diff {err:.2e})")
    info = check_detector(args.onnx)
    print(f"{args.onnx}: YOLO detector, input {info['input']} -> output {info['output']}, opset {info['opset']}")


if __name__ == "__main__":
    run_main(main)
