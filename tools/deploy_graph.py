"""The end-to-end graph of a YOLO detector ONNX (recipe key `deploy`): the engine takes the image as a camera gives it
and, optionally, returns the detections.

  images uint8 [N, H, W, 3] (or [N, 3, H, W]), letterboxed RGB
    -> Cast(float) -> Div(255) -> Transpose(0, 3, 1, 2) -> the original graph -> output0 [N, 84, A]
    -> (with NMS) Transpose(0, 2, 1) -> Slice: boxes [N, A, 4] (centre-size), scores [N, A, 80]
    -> EfficientNMS_TRT -> num_dets [N, 1] int32, det_boxes [N, max_det, 4] (x1 y1 x2 y2), det_scores [N, max_det],
                           det_classes [N, max_det] int32

Div(255), not Mul(1/255): the float tensor the original graph sees is bit-identical to
tools.yolo.preprocess.to_input's, the one every calibration tensor and every raw engine's input is made with. TensorRT
fuses the cast, scale and layout change into the first convolution's input reformat.
The graph is built from the ONNX the engine is built from: the FP32 model, or the ModelOpt Q/DQ model AFTER
quantization. The calibration floats are k/255 exactly (to_input of uint8 pixels), which is what Cast + Div(255)
produces from the same pixels, so quantizing the folded graph would calibrate on the same values and give the same
scales; folding afterwards keeps the Q/DQ scales byte-identical to the raw recipe's, so the end-to-end engine differs
from the raw engine only in the folded ops and the NMS, never in its calibration.
EfficientNMS_TRT is a TensorRT plugin (found by op type in the default domain by TensorRT's ONNX parser, once
libnvinfer_plugin is loaded: trtexec does it, tools/trtexec_py.py calls init_libnvinfer_plugins); ONNX Runtime cannot
run it. The fold alone runs anywhere. Its NMS is not ultralytics': it keeps the 4096 best-scoring (anchor, class)
candidates before NMS (ultralytics: 30000) and computes in the engine's precision.
Usage: python -m tools.deploy_graph MODEL.onnx -o OUT.onnx [--input uint8-nhwc|uint8-nchw] [--nms --conf --iou --max-det]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
import onnx

from tools.core.errors import UserError, run_main
from tools.core.files import atomic_path, digest, file_digest
from tools.core.recipe import from_dict

INPUT = "images"
FLOAT_INPUT = "/deploy/images_float"  # the original graph's input, renamed: `images` is the uint8 one now
PLUGIN = "EfficientNMS_TRT"
NMS_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
NHWC_TO_NCHW = (0, 3, 1, 2)


def load(path):
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - DecodeError, OSError, ... for a damaged file
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__}); export it again (make export)"
                        ) from None


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def fold_input(model, layout: str = "nhwc", source: str = "model"):
    """Give `model` (in place) a uint8 `images` input in `layout` (nhwc | nchw) that it casts, divides by 255 and
    transposes into its own float NCHW input."""

    graph = model.graph
    found = [i for i in graph.input if i.name == INPUT]
    dims = _dims(found[0]) if found else []
    if not found or found[0].type.tensor_type.elem_type != TensorProto.FLOAT or len(dims) != 4 or dims[1] != 3:
        raise UserError(f"{source}: has no float32 input {INPUT!r} of shape [N, 3, H, W] (already end to end?); "
                        f"pass the FP32 or Q/DQ detector the engine is built from")
    for node in graph.node:
        node.input[:] = [FLOAT_INPUT if n == INPUT else n for n in node.input]
    n, c, h, w = dims
    shape = [n, h, w, c] if layout == "nhwc" else [n, c, h, w]
    graph.input.remove(found[0])
    graph.input.insert(0, helper.make_tensor_value_info(INPUT, TensorProto.UINT8, shape))
    graph.initializer.append(numpy_helper.from_array(np.array(255, np.float32), "/deploy/255"))
    scaled = FLOAT_INPUT if layout == "nchw" else "/deploy/Div_output_0"
    nodes = [helper.make_node("Cast", [INPUT], ["/deploy/Cast_output_0"], name="/deploy/Cast", to=TensorProto.FLOAT),
             helper.make_node("Div", ["/deploy/Cast_output_0", "/deploy/255"], [scaled], name="/deploy/Div")]
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", [scaled], [FLOAT_INPUT], name="/deploy/Transpose",
                                      perm=list(NHWC_TO_NCHW)))
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    return model


def add_nms(model, conf: float, iou: float, max_det: int, source: str = "model"):
    """Replace `model`'s raw head output [N, 4 + classes, anchors] (in place) by EfficientNMS_TRT's four outputs:
    centre-size boxes, per-class NMS (as ultralytics' val: multi-label, classes kept apart), scores as they are."""

    graph = model.graph
    if len(graph.output) != 1 or len(_dims(graph.output[0])) != 3:
        raise UserError(f"{source}: expected one output [N, 4 + classes, anchors] (a YOLO detector exported without "
                        f"NMS), found {[o.name for o in graph.output]}")
    head = graph.output[0]
    batch = _dims(head)[0]
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), name) for v, name in
                             (([0], "/deploy/nms/0"), ([4], "/deploy/nms/4"), ([2], "/deploy/nms/axis"),
                              ([np.iinfo(np.int64).max], "/deploy/nms/end")))
    graph.node.extend([
        helper.make_node("Transpose", [head.name], ["/deploy/nms/Transpose_output_0"], name="/deploy/nms/Transpose",
                         perm=[0, 2, 1]),
        helper.make_node("Slice", ["/deploy/nms/Transpose_output_0", "/deploy/nms/0", "/deploy/nms/4",
                                   "/deploy/nms/axis"], ["/deploy/nms/boxes"], name="/deploy/nms/boxes"),
        helper.make_node("Slice", ["/deploy/nms/Transpose_output_0", "/deploy/nms/4", "/deploy/nms/end",
                                   "/deploy/nms/axis"], ["/deploy/nms/scores"], name="/deploy/nms/scores"),
        # attribute names and types: TensorRT plugin/efficientNMSPlugin (README and its plugin creator's fields)
        helper.make_node(PLUGIN, ["/deploy/nms/boxes", "/deploy/nms/scores"], list(NMS_OUTPUTS),
                         name=f"/deploy/nms/{PLUGIN}", background_class=-1, box_coding=1, iou_threshold=float(iou),
                         max_output_boxes=int(max_det), score_activation=0, score_threshold=float(conf),
                         class_agnostic=0)])
    graph.output.remove(head)
    graph.output.extend([helper.make_tensor_value_info("num_dets", TensorProto.INT32, [batch, 1]),
                         helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, [batch, max_det, 4]),
                         helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, [batch, max_det]),
                         helper.make_tensor_value_info("det_classes", TensorProto.INT32, [batch, max_det])])
    return model


def end_to_end(model, deploy, source: str = "model"):
    """`model` (in place) as the recipe's `deploy` (tools.core.recipe.Deploy) says; its metadata records the
    settings."""
    fold_input(model, deploy.layout, source)
    if deploy.nms is not None:
        add_nms(model, deploy.nms.conf, deploy.nms.iou, deploy.nms.max_det, source)
    entry = model.metadata_props.add()
    entry.key, entry.value = "deploy", json.dumps(deploy.model_dump())
    return model


def graph_path(source, deploy, layout) -> Path:
    """Where the end-to-end graph of `source` lies under `layout` (tools.core.layout): named by the source's bytes
    and the deploy settings."""
    return layout.deploy_onnx(source, digest({"source": file_digest(source), "deploy": deploy.model_dump()}))


def build(source, deploy, layout) -> Path:
    """The end-to-end graph of `source` (graph_path), made once per source bytes and settings."""
    source = Path(source)
    out = graph_path(source, deploy, layout)
    if out.is_file():
        return out
    model = end_to_end(load(source), deploy, str(source))
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def has_plugin(model) -> bool:
    return any(n.op_type == PLUGIN for n in model.graph.node)


# ----------------------------------------------------------------------------------------------------------------
def decode_nms(num_dets, boxes, scores, classes) -> list[np.ndarray]:
    """EfficientNMS_TRT's outputs for a batch -> per image (k, 6) float32 [x1, y1, x2, y2, score, class], the first
    num_dets rows (the rest of each row is padding)."""
    num_dets = np.asarray(num_dets).reshape(len(boxes), -1)[:, 0]
    out = []
    for k, b, s, c in zip(num_dets, boxes, scores, classes):
        k = int(np.clip(k, 0, len(b)))
        out.append(np.concatenate([np.asarray(b[:k], np.float32), np.asarray(s[:k], np.float32)[:, None],
                                   np.asarray(c[:k], np.float32)[:, None]], axis=1))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.deploy_graph", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the FP32 or Q/DQ detector ONNX an engine is built from")
    ap.add_argument("-o", "--output", required=True, help="end-to-end ONNX to write")
    ap.add_argument("--input", choices=("uint8-nhwc", "uint8-nchw"), default="uint8-nhwc")
    ap.add_argument("--nms", action="store_true", help="NMS inside (EfficientNMS_TRT; the engine must be TensorRT)")
    ap.add_argument("--conf", type=float, default=0.001, help="NMS score threshold (default: ultralytics val's)")
    ap.add_argument("--iou", type=float, default=0.7)
    ap.add_argument("--max-det", type=int, default=300)
    args = ap.parse_args(argv)
    nms = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det} if args.nms else None
    deploy = from_dict({"name": "cli", "deploy": {"input": args.input, "nms": nms}}, "tools.deploy_graph flags").deploy
    model = end_to_end(load(args.model), deploy, args.model)
    with atomic_path(args.output) as tmp:
        onnx.save(model, str(tmp))
    print(f"wrote {args.output}: input {INPUT} uint8 {deploy.layout.upper()}"
          + (f", {PLUGIN} (conf {args.conf:g}, IoU {args.iou:g}, {args.max_det} boxes)" if nms else ""))


if __name__ == "__main__":
    run_main(main)
