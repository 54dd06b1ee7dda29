"""Which blocks of a Q/DQ model cost the most accuracy when quantized, and the smallest exclusion set to fix it.

Starting from the recipe's INT8 Q/DQ model, each block (/model.K/, with the Detect head split into its box branch,
class branch and DFL) is put back to float on its own by bypassing the Q/DQ pairs that feed it, and ONNX Runtime
measures how far the model's detections are from the FP32 model's: mAP50-95 of the variant scored against the FP32
detections (score >= 0.25) as ground truth, on calibration images (never evaluation images, so the choice is not
fitted to the numbers we report). Blocks are then added greedily, most helpful first, until that agreement reaches
the target; the proposal is the recipe's exclusions plus those blocks. The sweep takes it as an axis value and
measures its real COCO mAP and speed on the GPU.
Usage: python -m tools.sensitivity recipes/yolo11n/int8-qdq.yaml --calib-dir DIR [--images 48] [--target 0.95]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np

from tools import yolo_graph
from tools.calib import select_images
from tools.common import REPO, UserError, list_images, positive_int, postprocess, preprocess, run_main, \
    to_input
from tools.records import Layout
from tools.recipe import load


def block_groups(node_names) -> dict[str, str]:
    """{label: node-name regex}: one group per top-level block, the Detect block (the one with the DFL) split into
    its box, class and DFL branches."""
    head = yolo_graph.head_block(node_names)
    if head is None:
        raise UserError("the quantized model has no YOLO11 Detect head (no single /model.K/dfl/ block); quantize a "
                        "YOLO11 detection model")
    groups = {f"model.{k}": rf"^/model\.{k}/" for k in yolo_graph.blocks(node_names) if k != head}
    for branch, regex in yolo_graph.head_branches(head).items():
        module = yolo_graph.HEAD_BRANCHES[branch][:-1]
        groups[f"head-{branch} (model.{head}.{module})"] = regex
    return groups


def bypass_qdq(model, pattern: str):
    """Copy of `model` where nodes matching `pattern` read the tensors their Q/DQ pairs quantized, in float."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    producer = {o: n for n in model.graph.node for o in n.output}
    rx = re.compile(pattern)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not rx.search(node.name):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear":
                q = producer.get(dq.input[0])
                node.input[i] = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else name
    return model


class Proxy:
    """Scores models by agreement with the FP32 model's detections on a fixed set of images."""

    def __init__(self, fp32_onnx, files, imgsz=640, ref_conf=0.25):
        self.classes = yolo_graph.describe(yolo_graph.load(fp32_onnx), fp32_onnx).classes
        self.batch = to_input(np.stack([preprocess(p, imgsz)[0] for p in files]))
        ref = self.detect(fp32_onnx)
        self.gt = self._coco_gt([d[d[:, 4] >= ref_conf] for d in ref])

    def detect(self, model) -> list[np.ndarray]:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        from tools.evaluate import onnxruntime_model
        from tools.qdq_fp16 import for_onnxruntime

        src = onnxruntime_model(model) if isinstance(model, (str, Path)) else \
            for_onnxruntime(model).SerializeToString()
        session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        out = np.concatenate([session.run(None, {name: self.batch[i:i + 8]})[0] for i in range(0, len(self.batch), 8)])
        return [postprocess(p) for p in out]

    def _coco_gt(self, dets):
        from faster_coco_eval import COCO

        anns = [{"id": 1 + j + 1000 * i, "image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0}
                for i, d in enumerate(dets) for j, (x1, y1, x2, y2, _, c) in enumerate(d.tolist())]
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {"images": [{"id": i} for i in range(len(dets))], "annotations": anns,
                          "categories": [{"id": c} for c in range(self.classes)]}
            gt.createIndex()
        return gt

    def score(self, model) -> float:
        from tools.evaluate import coco_stats

        res = [{"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
               for i, d in enumerate(self.detect(model)) for x1, y1, x2, y2, s, c in d.tolist()]
        return coco_stats(self.gt, res)[0] if res else 0.0


def analyse(recipe_path, calib_dir, eval_dir=None, images=48, target=0.95, max_groups=4, trt="8.6", log=print,
            previous: dict | None = None, calib_images: int | None = None) -> dict:
    """`previous`: an earlier result; its per-block gains are reused when it measured the same model on the same
    images (changing only the target or the group budget costs a few evaluations, not a full pass).
    `calib_images` caps the recipe's calibration images (a small folder, as `make`'s CALIB_IMAGES does)."""
    import onnx
    from tqdm import tqdm

    from tools.quantize import quantize

    recipe = load(recipe_path)
    if calib_images and recipe.calib_images > calib_images:
        recipe = recipe.replace(calib_images=calib_images)
    if yolo_graph.is_random_weights(recipe.onnx_path):
        raise UserError(f"{recipe.onnx_path}: random weights (exported from a model .yaml) detect nothing, so there is "
                        f"no agreement to measure; export the trained model (make export PT=...)")
    qdq_path = quantize(recipe, trt, calib_dir, eval_dir)
    files = select_images(list_images(calib_dir), images, seed=1)
    proxy = Proxy(recipe.onnx_path, files, recipe.imgsz)
    qdq = onnx.load(str(qdq_path))
    base = proxy.score(qdq)
    log(f"{recipe.name}: agreement with FP32 {base:.4f} with every block as quantized by the recipe")
    groups = block_groups([n.name for n in qdq.graph.node])
    same = previous and previous.get("qdq_model") == str(qdq_path.relative_to(REPO)) and \
        previous.get("images") == len(files) and previous.get("image_dir") == str(calib_dir)
    gains = {b["block"]: b["gain"] for b in previous["blocks"]} if same else {}
    for label, pattern in tqdm([g for g in groups.items() if g[0] not in gains], desc="blocks", unit="block"):
        gains[label] = proxy.score(bypass_qdq(qdq, pattern)) - base
    ranked = sorted(gains, key=gains.get, reverse=True)
    chosen, current, steps = [], base, []
    for label in ranked[:max_groups]:
        if current >= target or gains[label] <= 0:
            break
        chosen.append(label)
        current = proxy.score(bypass_qdq(qdq, "|".join(groups[g] for g in chosen)))
        steps.append({"blocks": list(chosen), "agreement": round(current, 5)})
        log(f"  + {label}: agreement {current:.4f}")
    return {"recipe": recipe.name, "qdq_model": str(qdq_path.relative_to(REPO)), "images": len(files),
            "image_dir": str(calib_dir), "metric": "mAP50-95 against FP32 detections (score >= 0.25)",
            "baseline_agreement": round(base, 5), "target": target,
            "blocks": [{"block": g, "regex": groups[g], "gain": round(gains[g], 5)} for g in ranked],
            "steps": steps,
            "proposal": {"blocks": chosen, "agreement": round(current, 5), "reached_target": current >= target,
                         "nodes_to_exclude": list(recipe.nodes_to_exclude) + [groups[g] for g in chosen]}}


def markdown(res: dict) -> str:
    lines = [f"# Quantization sensitivity of `{res['recipe']}`", "",
             f"Metric: {res['metric']} on {res['images']} calibration images; all blocks INT8 as in the recipe: "
             f"{res['baseline_agreement']:.4f}.", "", "| block | gain when kept in float |", "|---|---|"]
    lines += [f"| {b['block']} | {b['gain']:+.4f} |" for b in res["blocks"]]
    p = res["proposal"]
    lines += ["", f"Proposal ({'reaches' if p['reached_target'] else 'does not reach'} the target {res['target']}): "
              f"keep {', '.join(p['blocks']) or 'nothing more'} in float; agreement {p['agreement']:.4f}.",
              "", "`nodes_to_exclude`: " + ", ".join(f"`{x}`" for x in p["nodes_to_exclude"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.sensitivity", description=__doc__)
    ap.add_argument("recipe")
    ap.add_argument("--calib-dir", required=True, help="images to measure on (calibration images, not evaluation)")
    ap.add_argument("--eval-dir", help="evaluation folder (only checked for overlap when calibrating)")
    ap.add_argument("--images", type=positive_int, default=48, help="calibration images to measure agreement on")
    ap.add_argument("--calib-images", type=positive_int, help="cap the recipe's calib_images (a small folder)")
    ap.add_argument("--target", type=float, default=0.95, help="agreement (mAP50-95 vs FP32) to reach")
    ap.add_argument("--max-groups", type=positive_int, default=4)
    ap.add_argument("--trt", default="8.6")
    ap.add_argument("-o", "--output", help="default: runs/<model>/sensitivity.json (+ .md)")
    ap.add_argument("--overwrite", action="store_true", help="replace a committed result")
    args = ap.parse_args(argv)
    recipe = load(args.recipe)
    out = Path(args.output) if args.output else Layout(recipe.model).out / "sensitivity.json"
    layout = Layout(recipe.model, REPO, out.parent.parent, args.overwrite)
    for path in (out, out.with_suffix(".md")):  # refused before the analysis, not after it
        layout.guard(path)
    previous = json.loads(out.read_text()) if out.is_file() else None
    res = analyse(args.recipe, args.calib_dir, args.eval_dir, args.images, args.target, args.max_groups, args.trt,
                  previous=previous, calib_images=args.calib_images)
    layout.write_json(out, res)
    layout.write_text(out.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    run_main(main)
