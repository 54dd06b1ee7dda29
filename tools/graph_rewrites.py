"""Apply tools/yolo/graph_rewrites.py's exact graph rewrites to a YOLO11 detector ONNX (what a recipe's
`graph_rewrites` does before ModelOpt or the FP16 build), to inspect or time them by hand.
`split-conv`: every C3k2/C2PSA `cv1` convolution + Split becomes one convolution per part, so no Split view feeds a
Concat. `head-split`: the Detect head's box and class branches are reshaped and concatenated apart.
Usage: python -m tools.graph_rewrites IN.onnx OUT.onnx --rewrites split-conv,head-split
"""
from __future__ import annotations

import argparse

import onnx

from tools.core.errors import run_main
from tools.core.files import atomic_path
from tools.core.recipe import GRAPH_REWRITES
from tools.yolo.graph import load
from tools.yolo.graph_rewrites import apply


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.graph_rewrites", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="a YOLO11 detector ONNX (FP32, as exported)")
    ap.add_argument("output")
    ap.add_argument("--rewrites", default=",".join(GRAPH_REWRITES),
                    help=f"comma-separated, applied in order, of: {', '.join(GRAPH_REWRITES)}")
    args = ap.parse_args(argv)
    model = load(args.input)
    before = len(model.graph.node)
    changed = apply(model, args.rewrites.split(","), args.input)
    with atomic_path(args.output) as tmp:
        onnx.save(model, str(tmp))
    for rewrite, nodes in changed.items():
        print(f"{rewrite}: {len(nodes)} Split nodes rewritten away" + ("" if nodes else " (already in its form)"))
    print(f"{before} -> {len(model.graph.node)} nodes -> {args.output}")


if __name__ == "__main__":
    run_main(main)
