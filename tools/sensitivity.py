"""Which blocks or layers of a Q/DQ model cost the most accuracy when quantized, and the smallest exclusion set to fix it.

Starting from the recipe's INT8 Q/DQ model, each block (/model.K/, with the Detect head split into its box branch,
class branch and DFL), or with `--unit layer` each node that reads a quantized activation (every Conv, and the Add,
Concat, MaxPool and Resize nodes ModelOpt quantizes), is put back to float on its own by bypassing the Q/DQ pairs that
feed it (its weights stay as quantized: the proxy measures activation quantization), and ONNX Runtime
measures how far the model's detections are from the FP32 model's: mAP50-95 of the variant scored against the FP32
detections (score >= 0.25) as ground truth, on calibration images (never evaluation images, so the choice is not
fitted to the numbers we report). Groups are then added greedily, most helpful first, until that agreement reaches
the target; the proposal is the recipe's exclusions plus those groups. The sweep takes it as an axis value and
measures its real COCO mAP and speed on the GPU.
Latency-aware (`--profile BY_BLOCK_CSV`, from `make profile`): each group's cost is what it adds to the engine when it
runs in FP16 instead of INT8, read from the per-layer profile: a block's time in the FP16 engine minus its time in
the INT8 one, or for a layer the same from the engines' per-layer CSVs beside the by-block table (a TensorRT layer's
time shared among the nodes it fuses). The reformats at a group's new borders are not in it, so the estimate is
optimistic. Groups are then taken by agreement gained per millisecond (those that cost nothing first), and one that
would take the total over `--ms-budget` is skipped.
Usage: python -m tools.sensitivity recipes/int8-qdq.yaml [--model yolo11n] --calib-dir DIR [--images 48] [--target 0.95]
       [--unit layer --max-groups 8] [--profile results/yolo11n/profile/b32-L3/by-block.csv --ms-budget 0.05]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from faster_coco_eval import COCO
from tqdm import tqdm

from tools.calib import select_images
from tools.core.cli import add_data, add_model, add_results, add_trt, detect_version, non_negative_number, \
    positive_int, positive_number
from tools.core.errors import UserError, run_main
from tools.core.files import REPO, list_images
from tools.core.layout import Layout
from tools.core.recipe import load
from tools.core.record import read_json
from tools.evaluate import coco_stats, onnxruntime_model
from tools.quantize import quantize
from tools.yolo import graph as yolo_graph
from tools.yolo.decode import postprocess
from tools.yolo.layers import read_by_block
from tools.yolo.preprocess import preprocess, to_input
from tools.yolo.qdq_fp16 import for_onnxruntime


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


def quantized_source(producer: dict, tensor: str) -> str | None:
    """The float tensor a Q/DQ pair quantized into `tensor` (a DequantizeLinear's output fed by a QuantizeLinear),
    or None where `tensor` is no such pair's output (a weight's DequantizeLinear reads an initializer: None)."""
    dq = producer.get(tensor)
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def layer_groups(model) -> dict[str, str]:
    """{node name: regex matching it alone}: every node that reads an activation through a Q/DQ pair, which
    `bypass_qdq` can put back in float, in graph order (Shape reads no values: left out)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    return {n.name: rf"^{re.escape(n.name)}$" for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Shape")
            and any(quantized_source(producer, i) for i in n.input)}


def groups_of(model, unit: str) -> dict[str, str]:
    return layer_groups(model) if unit == "layer" else block_groups([n.name for n in model.graph.node])


def layers_block(label: str) -> str:
    """The block name the per-layer tables (tools/yolo/layers.py) give the same group: model.K, or model.K/cv2|cv3|dfl
    for the head's branches."""
    m = re.fullmatch(r"head-\w+ \(model\.(\d+)\.(\w+)\)", label)
    return f"model.{m.group(1)}/{m.group(2)}" if m else label


def block_costs(csv_path, recipe: str) -> dict[str, float]:
    """{profile block: ms it adds when it runs in FP16 rather than as in `recipe`'s engine}: its time in the FP16
    engine minus its time in the recipe's engine (by-block.csv of `make profile`); negative where FP16 is faster."""
    path = Path(csv_path)
    rows = read_by_block(path)  # a missing table is its one-line error
    column = f"ms_{recipe}"
    first = next(iter(rows.values()), {})
    if "ms_fp16" not in first or column not in first:
        raise UserError(f"{path}: needs the columns ms_fp16 and {column} (a `make profile` of fp16 and {recipe})")
    return {b: float(r["ms_fp16"]) - float(r[column]) for b, r in rows.items() if b != "all"}


def layer_costs(csv_path, recipe: str, nodes) -> dict[str, float]:
    """{node: ms it adds when it runs in FP16 rather than as in `recipe`'s engine}, from the per-layer CSVs `make
    profile` writes beside its by-block table (`fp16.layers.csv`, `<recipe>.layers.csv`). A TensorRT layer's time is
    shared equally among the given nodes it runs (a conv's fused activation is not one of them, so the conv gets it
    all); a node neither engine runs costs nothing."""
    block_costs(csv_path, recipe)  # the by-block table must compare fp16 with `recipe`: its layer tables are beside it
    folder, nodes = Path(csv_path).parent, set(nodes)

    def shares(engine: str) -> dict[str, float]:
        path = folder / f"{engine}.layers.csv"
        if not path.is_file():
            raise UserError(f"{path}: no per-layer table of {engine} beside {Path(csv_path).name}; run `make profile "
                            f"RECIPE=recipes/{recipe}.yaml` (it writes both engines' tables)")
        out: dict[str, float] = defaultdict(float)
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                mine = [n for n in row["onnx_nodes"].split() if n in nodes]
                for n in mine:
                    out[n] += float(row["ms"]) / len(mine)
        return out

    fp16, ours = shares("fp16"), shares(recipe)
    return {n: fp16.get(n, 0.0) - ours.get(n, 0.0) for n in nodes}


def block_cost(costs: dict[str, float], label: str) -> float:
    """The ms of a sensitivity group in `block_costs` (blocks) or `layer_costs` (nodes, their own labels); a group the
    profile lacks ran nowhere: it costs nothing."""
    return costs.get(layers_block(label), 0.0)


def latency_order(gains: dict[str, float], costs: dict[str, float]) -> list[str]:
    """Groups that help, those costing nothing first (most gain first), then by gain per millisecond."""
    helpful = [b for b in gains if gains[b] > 0]
    cost = lambda b: block_cost(costs, b)  # noqa: E731
    return sorted(helpful, key=lambda b: (cost(b) > 0, -gains[b] if cost(b) <= 0 else -gains[b] / cost(b)))


def bypass_qdq(model, pattern: str):
    """Copy of `model` where nodes matching `pattern` read the tensors their Q/DQ pairs quantized, in float."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    producer = {o: n for n in model.graph.node for o in n.output}
    rx = re.compile(pattern)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not rx.search(node.name):
            continue
        for i, name in enumerate(node.input):
            node.input[i] = quantized_source(producer, name) or name
    return model


class Proxy:
    """Scores models by agreement with the FP32 model's detections on a fixed set of images."""
    def __init__(self, fp32_onnx, files, imgsz=640, ref_conf=0.25):
        self.classes = yolo_graph.describe(yolo_graph.load(fp32_onnx), fp32_onnx).classes
        self.batch = to_input(np.stack([preprocess(p, imgsz)[0] for p in files]))
        ref = self.detect(fp32_onnx)
        self.gt = self._coco_gt([d[d[:, 4] >= ref_conf] for d in ref])

    def detect(self, model) -> list[np.ndarray]:
        ort.set_default_logger_severity(3)

        src = onnxruntime_model(model) if isinstance(model, (str, Path)) else \
            for_onnxruntime(model).SerializeToString()
        session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        out = np.concatenate([session.run(None, {name: self.batch[i:i + 8]})[0] for i in range(0, len(self.batch), 8)])
        return [postprocess(p) for p in out]

    def _coco_gt(self, dets):
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
        res = [{"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
               for i, d in enumerate(self.detect(model)) for x1, y1, x2, y2, s, c in d.tolist()]
        return coco_stats(self.gt, res)[0] if res else 0.0


def analyse(recipe_path, calib_dir, eval_dir=None, images=48, target=0.95, max_groups=4, trt=None, log=print,
            previous: dict | None = None, calib_images: int | None = None, profile=None,
            ms_budget: float | None = None, unit: str = "block", model: str | None = None) -> dict:
    """`unit`: `block` or `layer`, what one group is; `model`: the size the recipe runs on (tools/core/recipe.py load).
    `previous`: an earlier result; its per-group gains are reused when it measured the same model on the same
    images with the same unit (changing only the target or the group budget costs a few evaluations, not a full pass).
    `calib_images` caps the recipe's calibration images (a small folder, as `make`'s CALIB_IMAGES does).
    `profile`: a by-block.csv of `make profile`; groups are then chosen by gain per millisecond within `ms_budget`."""
    recipe = load(recipe_path, model)
    costs = block_costs(profile, recipe.name) if profile else None  # a wrong profile fails before the long work
    if calib_images and recipe.calib_images > calib_images:
        recipe = recipe.replace(calib_images=calib_images)
    if yolo_graph.is_random_weights(recipe.onnx_path):
        raise UserError(f"{recipe.onnx_path}: random weights (exported from a model .yaml) detect nothing, so there is "
                        f"no agreement to measure; export the trained model (make export PT=...)")
    qdq_path = quantize(recipe, trt or detect_version(), calib_dir, eval_dir)
    files = select_images(list_images(calib_dir), images, seed=1)
    proxy = Proxy(recipe.onnx_path, files, recipe.imgsz)
    qdq = onnx.load(str(qdq_path))
    base = proxy.score(qdq)
    log(f"{recipe.name}: agreement with FP32 {base:.4f} with every {unit} as quantized by the recipe")
    groups = groups_of(qdq, unit)
    if costs is not None and unit == "layer":
        costs = layer_costs(profile, recipe.name, groups)  # per node, from the layer tables beside the by-block one
    same = previous and previous.get("qdq_model") == str(qdq_path.relative_to(REPO)) and \
        previous.get("images") == len(files) and previous.get("image_dir") == str(calib_dir) and \
        previous.get("unit", "block") == unit
    gains = {b["block"]: b["gain"] for b in previous["blocks"]} if same else {}
    for label, pattern in tqdm([g for g in groups.items() if g[0] not in gains], desc=f"{unit}s", unit=unit):
        gains[label] = proxy.score(bypass_qdq(qdq, pattern)) - base
    ranked = sorted(gains, key=gains.get, reverse=True)
    cost = (lambda b: max(block_cost(costs, b), 0.0)) if costs else (lambda b: 0.0)  # noqa: E731
    candidates = latency_order(gains, costs) if costs else [b for b in ranked if gains[b] > 0]
    chosen, current, steps, spent = [], base, [], 0.0
    for label in candidates:
        if current >= target or len(chosen) == max_groups:
            break
        if ms_budget is not None and spent + cost(label) > ms_budget:
            continue
        chosen.append(label)
        spent += cost(label)
        current = proxy.score(bypass_qdq(qdq, "|".join(groups[g] for g in chosen)))
        steps.append({"blocks": list(chosen), "agreement": round(current, 5), "ms_added": round(spent, 4)})
        log(f"  + {label}: agreement {current:.4f}" + (f", about +{spent:.3f} ms" if costs else ""))
    latency = {"profile": str(profile), "ms_budget": ms_budget,
               "ms_added": {g: round(block_cost(costs, g), 4) for g in ranked}} if costs else None
    return {"recipe": recipe.name, "unit": unit, "qdq_model": str(qdq_path.relative_to(REPO)), "images": len(files),
            "image_dir": str(calib_dir), "metric": "mAP50-95 against FP32 detections (score >= 0.25)",
            "baseline_agreement": round(base, 5), "target": target,
            "blocks": [{"block": g, "regex": groups[g], "gain": round(gains[g], 5)} for g in ranked],
            "steps": steps, "latency": latency,
            "proposal": {"blocks": chosen, "agreement": round(current, 5), "reached_target": current >= target,
                         "ms_added": round(spent, 4) if costs else None,
                         "nodes_to_exclude": list(recipe.nodes_to_exclude) + [groups[g] for g in chosen]}}


def markdown(res: dict) -> str:
    lat = res.get("latency")
    unit = res.get("unit", "block")
    lines = [f"# Quantization sensitivity of `{res['recipe']}`" + (", layer by layer" if unit == "layer" else ""), "",
             f"Metric: {res['metric']} on {res['images']} calibration images; all {unit}s INT8 as in the recipe: "
             f"{res['baseline_agreement']:.4f}."]
    if lat:
        source = "its FP16-engine time minus its INT8-engine time" if unit == "block" else \
            "its TensorRT layer's time in the FP16 engine minus in the INT8 one, from the per-layer CSVs beside it"
        lines += ["", f"Latency-aware: each {unit}'s ms is what it adds in FP16, from `{lat['profile']}` ({source}; "
                      f"border reformats not counted); budget "
                      f"{'none' if lat['ms_budget'] is None else str(lat['ms_budget']) + ' ms'}."]
    lines += ["", f"| {unit} | gain when kept in float |" + (" ms added in FP16 |" if lat else ""),
              "|---|---|" + ("---|" if lat else "")]
    lines += [f"| {b['block']} | {b['gain']:+.4f} |" + (f" {lat['ms_added'][b['block']]:+.3f} |" if lat else "")
              for b in res["blocks"]]
    p = res["proposal"]
    lines += ["", f"Proposal ({'reaches' if p['reached_target'] else 'does not reach'} the target {res['target']}): "
              f"keep {', '.join(p['blocks']) or 'nothing more'} in float; agreement {p['agreement']:.4f}"
              + (f", about {p['ms_added']:+.3f} ms" if lat else "") + ".",
              "", "`nodes_to_exclude`: " + ", ".join(f"`{x}`" for x in p["nodes_to_exclude"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.sensitivity", description=__doc__)
    ap.add_argument("recipe")
    add_model(ap)
    add_data(ap)  # it measures on calibration images, never on evaluation images
    ap.add_argument("--images", type=positive_int, default=48, help="calibration images to measure agreement on")
    ap.add_argument("--target", type=positive_number, default=0.95, help="agreement (mAP50-95 vs FP32) to reach")
    ap.add_argument("--unit", choices=("block", "layer"), default="block",
                    help="what is put back in float at a time: a YOLO block, or one node (every quantized Conv, ...)")
    ap.add_argument("--max-groups", type=positive_int, default=4, help="most blocks or layers the proposal keeps in "
                                                                         "float")
    ap.add_argument("--profile", help="by-block.csv of `make profile` (fp16 and this recipe; per layer: its layer "
                                      "CSVs beside it): choose groups by agreement gained per millisecond")
    ap.add_argument("--ms-budget", type=non_negative_number,
                    help="with --profile: most milliseconds the float groups may add")
    add_trt(ap)
    add_results(ap)
    ap.add_argument("-o", "--output", help="default: <results>/<model>/sensitivity[-layers].json (+ .md)")
    args = ap.parse_args(argv)
    recipe = load(args.recipe, args.model)
    plain_name = "sensitivity-layers.json" if args.unit == "layer" else "sensitivity.json"
    default = Layout(recipe.model, results=Path(args.results).resolve()).out / plain_name
    out = Path(args.output) if args.output else default
    layout = Layout(recipe.model, REPO, out.parent.parent, args.overwrite)
    for path in (out, out.with_suffix(".md")):  # refused before the analysis, not after it
        layout.guard(path)
    if args.ms_budget is not None and not args.profile:
        raise UserError("--ms-budget needs --profile (the by-block.csv of `make profile`) to know what blocks cost")
    # per-group gains are reused from an earlier result on the same model, images and unit: this file's, or the
    # plain one's
    earlier = next((p for p in (out, out.parent / plain_name) if p.is_file()), None)
    previous = read_json(earlier, "sensitivity result") if earlier else None
    res = analyse(args.recipe, args.calib_dir, args.eval_dir, args.images, args.target, args.max_groups, args.trt,
                  previous=previous, calib_images=args.calib_images, profile=args.profile, ms_budget=args.ms_budget,
                  unit=args.unit, model=args.model)
    layout.write_json(out, res)
    layout.write_text(out.with_suffix(".md"), markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    run_main(main)
