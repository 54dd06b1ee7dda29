"""Apply the Q/DQ placement rewrites of tools/yolo/qdq_rules.py to a Q/DQ model (what recipe key `qdq_rewrites` does
after ModelOpt).
Usage (on a Q/DQ model): python -m tools.qdq_rules IN.onnx OUT.onnx --rewrites concat
"""
from __future__ import annotations

import argparse
from pathlib import Path

import onnx

from tools.core.errors import UserError, run_main
from tools.core.files import atomic_path
from tools.core.recipe import REWRITES
from tools.yolo import graph as yolo_graph
from tools.yolo.qdq_rules import apply


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.qdq_rules", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="a Q/DQ ONNX model (from make quantize)")
    ap.add_argument("output")
    ap.add_argument("--rewrites", default="concat", help=f"comma-separated, of: {', '.join(REWRITES)}")
    args = ap.parse_args(argv)
    if not Path(args.input).is_file():
        raise UserError(f"{args.input}: no such model; give a Q/DQ model (`make quantize` writes them to models/)")
    model = yolo_graph.load(args.input)
    changed = apply(model, args.rewrites.split(","))
    with atomic_path(args.output) as tmp:
        onnx.save(model, str(tmp))
    for rewrite, nodes in changed.items():
        print(f"{rewrite}: {len(nodes)} nodes rewritten -> {args.output}")


if __name__ == "__main__":
    run_main(main)
