"""Print what tools/yolo/graph.py derives from a YOLO11 detection ONNX: its input and output, classes, size, blocks,
Detect head and its branches, and whether its weights are random.
Usage: python -m tools.yolo_graph MODEL.onnx
"""
from __future__ import annotations

import argparse

from tools.core.errors import run_main
from tools.yolo.graph import WEIGHTS_KEY, anchor_count, describe, load


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.yolo_graph", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", help="YOLO11 detection ONNX")
    args = ap.parse_args(argv)
    g = describe(load(args.onnx), args.onnx)
    size = f"{g.imgsz}x{g.imgsz}, {g.anchors} anchors" if g.imgsz else \
        f"dynamic (e.g. {anchor_count(640)} anchors at 640x640)"
    print(f"{args.onnx}: input {g.input_name} {g.input} -> {g.output}; {g.classes} classes; size {size}")
    print(f"  blocks {g.blocks[0]}..{g.blocks[-1]}, Detect head model.{g.head}, attention in "
          f"{', '.join(f'model.{k}' for k in g.attention) or 'none'}")
    print("  head branches: " + ", ".join(f"{k} {v}" for k, v in g.branches.items()))
    print(f"  weights: {g.metadata.get(WEIGHTS_KEY, 'as exported (not marked random)')}")


if __name__ == "__main__":
    run_main(main)
