"""Get a checked YOLO11 detection ONNX: export a `.pt` (or a model `.yaml`) through ultralytics, or take an ONNX.

Either way the model is checked for the detector layout (input [N,3,H,W], output [N,4+classes,anchors]), for a
YOLO11 Detect head (tools/yolo/graph.py) and with onnx.checker; an exported model is also run in ONNX Runtime and
compared with PyTorch. Exports have dynamic batch/height/width like the shipped yolo11n.onnx (engines are built with
explicit shapes). A model .yaml (ultralytics ships yolo11n/s/m/l/x.yaml) gives random weights, seeded, so two
exports are byte-identical; its ONNX is marked `weights: random (...)` in its metadata: speed only, no accuracy.
Usage: python -m tools.export --pt yolo11s.yaml --onnx models/yolo11/yolo11s.onnx
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tools.core.cli import add_imgsz
from tools.core.errors import UserError, run_main
from tools.core.files import atomic_path, sha256_file
from tools.yolo import graph as yolo_graph


def check_detector(onnx_path) -> dict:
    """The YOLO11 detector layout and Detect head, then onnx.checker; returns what tools.yolo.graph derives
    (input_name, input, output, classes, imgsz, anchors, blocks, head, ...), random_weights and the opset."""

    path = Path(onnx_path)
    model = yolo_graph.load(path)
    graph = yolo_graph.describe(model, path)  # the cheap structural check first: a classifier stops here
    try:
        onnx.checker.check_model(model)
    except Exception as e:  # ValidationError and friends
        raise UserError(f"{path}: not a valid ONNX model ({type(e).__name__}); re-export it") from None
    return {**dataclasses.asdict(graph), "random_weights": graph.random_weights, "opset": model.opset_import[0].version}


def check_target(name: str, out: Path, random: bool) -> None:
    """Refuse an export that would overwrite another model's ONNX: with the Makefile's default ONNX (MODEL=yolo11n)
    `make export PT=yolo11s.pt` would replace yolo11n.onnx, and a random-weight export would replace trained ones."""
    if name and yolo_graph.MODEL_NAME.fullmatch(out.stem) and out.stem != name:
        raise UserError(f"{out}: is named for {out.stem} but the model is {name}; write it to "
                        f"{out.with_name(name + '.onnx')} (make export MODEL={name} PT=...)")
    if random and out.is_file():
        try:
            trained = not yolo_graph.is_random_weights(out)
        except UserError:  # unreadable: nothing worth keeping
            trained = False
        if trained:
            raise UserError(f"{out}: holds trained weights that a random-weight export would replace; pass another "
                            f"--onnx (ONNX=... with make)")


def load_model(pt, seed: int):
    """The ultralytics model of a .pt, or of a model .yaml with its random initialisation seeded."""
    import torch  # optional: only exporting from a .pt needs torch and ultralytics (not the GPU side)

    os.environ.setdefault("YOLO_OFFLINE", "1")  # an export needs no network: keep ultralytics from probing for one
    from ultralytics import YOLO  # optional: as torch

    random = str(pt).endswith((".yaml", ".yml"))
    if not random and not Path(pt).is_file():
        raise UserError(f"{pt}: no such checkpoint; pass a YOLO11 .pt (or a model .yaml for a random-weight model)")
    torch.manual_seed(seed)  # the .yaml's weights are torch's random init: seeded, two exports are byte-identical
    try:
        model = YOLO(str(pt))
    except FileNotFoundError:
        raise UserError(f"{pt}: ultralytics has no such model file; pass a .pt or e.g. yolo11s.yaml") from None
    if model.task != "detect":
        raise UserError(f"{pt}: a {model.task} model, not a detector; pass a YOLO11 detection model (e.g. yolo11s.pt)")
    return model, random


def weights_note(pt, random: bool, seed: int) -> str:
    if random:
        return yolo_graph.random_weights_note(Path(pt).name, seed)
    return f"trained checkpoint {Path(pt).name} (sha256 {sha256_file(pt)})"


def write_onnx(src: Path, out, note: str) -> None:
    """Copy ultralytics' ONNX to `out` with our provenance in its metadata, byte-identical for the same weights (cache
    keys hash the ONNX bytes: a re-export must reuse the finished work). So the export date goes, and the
    intermediate shapes (value_info) are ONNX's own shape inference instead of torch's exporter's, which writes each
    several times with symbolic sizes that change from run to run. ONNX's inference also has to be complete here:
    ModelOpt runs it in place on the model it quantizes (onnx.shape_inference.infer_shapes_path), so a model without
    it is rewritten, and its digest changed, by its first quantization."""

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    props = [(p.key, p.value) for p in model.metadata_props if p.key not in ("date", yolo_graph.WEIGHTS_KEY)]
    del model.metadata_props[:]
    for key, value in props + [(yolo_graph.WEIGHTS_KEY, note)]:
        model.metadata_props.add(key=key, value=value)
    with atomic_path(out) as dst:
        onnx.save(model, str(dst))


def export_pt(pt, out, imgsz=640, opset=17, dynamic=True, seed=0) -> float:
    """ultralytics export of `pt` (a .pt or a model .yaml) to `out`; returns the max |ONNX Runtime - PyTorch| on
    one input."""
    import torch  # optional: as in load_model

    model, random = load_model(pt, seed)
    check_target(Path(model.model.yaml.get("yaml_file", "")).stem, Path(out), random)
    with tempfile.TemporaryDirectory() as tmp:
        # ultralytics writes the ONNX beside the checkpoint (into the working directory for a .yaml): send it to tmp
        model.model.pt_path = str(Path(tmp) / Path(pt).with_suffix(".pt").name)
        src = model.export(format="onnx", imgsz=imgsz, opset=opset, dynamic=dynamic, simplify=True, project=tmp,
                           device="cpu")
        write_onnx(Path(src), out, weights_note(pt, random, seed))
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    net = model.model.float().eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x))
    ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.abs(got - ref).max())


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pt", help="YOLO11 .pt checkpoint (or ultralytics model .yaml: random weights) to export; "
                                 "omit to check --onnx")
    ap.add_argument("--onnx", required=True, help="ONNX to write (with --pt) or to check")
    add_imgsz(ap, "size traced and compared (with --static: the input size)")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--static", action="store_true", help="fixed [1,3,imgsz,imgsz] input (default: dynamic "
                                                          "batch/height/width, which engines with batch > 1 need)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of a .yaml model's random weights")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="max |ONNX Runtime - PyTorch| accepted")
    args = ap.parse_args(argv)
    if args.pt:
        err = export_pt(args.pt, args.onnx, args.imgsz, args.opset, not args.static, args.seed)
        if err > args.tolerance:
            Path(args.onnx).unlink()
            raise UserError(f"{args.onnx}: ONNX Runtime differs from PyTorch by {err:.3g} (> {args.tolerance}); "
                            f"export with another --opset")
        print(f"exported {args.pt} -> {args.onnx} (ONNX Runtime vs PyTorch max abs diff {err:.2e})")
    info = check_detector(args.onnx)
    print(f"{args.onnx}: YOLO11 detector, input {info['input']} -> output {info['output']}, {info['classes']} "
          f"classes, Detect head model.{info['head']}, opset {info['opset']}"
          + ("; RANDOM WEIGHTS: speed only, no accuracy" if info["random_weights"] else ""))


if __name__ == "__main__":
    run_main(main)
