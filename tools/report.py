"""results/<model>/REPORT.md: the sweep table, Pareto plots, the chosen configuration and how to deploy it.

Selection rule (stated in the report): the fastest INT8-mixed configuration at batch 1 whose mAP50-95 is within
BUDGET (mAP points, default 0.5) of the FP16 engine; and the throughput-optimal one at the largest batch under the
same budget. Both are set against the two Ultralytics recipes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.common import REPO, UserError, atomic_path, run_main, write_text

ULTRALYTICS = ("int8-implicit", "int8-ultralytics")


def best_row(row, field):
    """The faster of the CUDA-graph and plain timings of a row (a deployment picks the better one)."""
    graph = {"latency_ms_p50": "latency_ms_p50_cuda_graph", "throughput_ips": "throughput_ips_cuda_graph"}[field]
    values = [v for v in (row.get(field), row.get(graph)) if v is not None]
    return (min if field.startswith("latency") else max)(values)


def p99(row) -> float | None:
    """p99 of the mode (CUDA graph or not) whose median best_row reports."""
    graph = row.get("latency_ms_p50_cuda_graph")
    if graph is not None and graph <= row["latency_ms_p50"]:
        return row.get("latency_ms_p99_cuda_graph")
    return row.get("latency_ms_p99")


def fp16_baseline(at_batch: dict[str, dict], row: dict) -> tuple[dict | None, bool]:
    """The FP16 row to set `row` against: one built at the same builder level if the sweep has it (the level alone
    moves latency a lot), else any FP16 row; the flag says whether the levels match."""
    fp16 = [r for r in at_batch.values() if r["precision"] == "fp16"]
    same = [r for r in fp16 if r.get("level") == row.get("level")]
    return (same or fp16 or [None])[0], bool(same)


def by_config(rows: list[dict], batch: int) -> dict[str, dict]:
    return {r["config"]: r for r in rows if r["batch"] == batch}


def select(rows: list[dict], budget: float) -> dict:
    """Apply the stated rule; budget in mAP points (0.5 = 0.005 mAP50-95)."""
    batches = sorted({r["batch"] for r in rows})
    small, large = batches[0], batches[-1]
    at_small, at_large = by_config(rows, small), by_config(rows, large)
    if "fp16" not in at_small:
        raise UserError("the sweep has no fp16 row: include recipes/<model>/fp16.yaml in the grid's references")
    fp16 = at_small["fp16"]
    floor = fp16["map50_95"] - budget / 100
    int8 = [c for c, r in at_small.items() if r["precision"] in ("int8-qdq", "int8-implicit")]
    closest = max(int8, key=lambda c: at_small[c]["map50_95"]) if int8 else None
    mixed = [c for c in int8 if at_small[c]["map50_95"] >= floor]
    if not mixed:
        return {"budget": budget, "fp16_map50_95": fp16["map50_95"], "latency": None, "throughput": None,
                "closest": closest, "small_batch": small, "large_batch": large}
    fastest = min(mixed, key=lambda c: best_row(at_small[c], "latency_ms_p50"))
    mixed_large = [c for c in mixed if c in at_large]
    widest = max(mixed_large, key=lambda c: best_row(at_large[c], "throughput_ips")) if mixed_large else None
    return {"budget": budget, "fp16_map50_95": fp16["map50_95"], "latency": fastest, "throughput": widest,
            "closest": closest, "small_batch": small, "large_batch": large}


def pareto_plot(rows, batch, field, out, title, xlabel):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(best_row(r, field), r["map50_95"] * 100, r["config"], r["precision"])
           for r in rows if r["batch"] == batch]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"fp16": "tab:blue", "int8-qdq": "tab:orange", "int8-implicit": "tab:green"}
    for x, y, name, prec in pts:
        ax.scatter(x, y, color=colours.get(prec, "grey"), s=30)
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    better = (lambda a, b: a <= b) if field.startswith("latency") else (lambda a, b: a >= b)
    front = sorted((p for p in pts if not any(better(q[0], p[0]) and q[1] >= p[1] and q != p for q in pts)),
                   key=lambda p: p[0])
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mAP50-95 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def table(rows, batch) -> str:
    lines = ["| configuration | calibration | images | kept in float | level | p50 ms | p99 ms | img/s | mAP50-95 | "
             "exact-158 mAP50-95 | mAP50 |", "|" + "---|" * 11]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in sorted((r for r in rows if r["batch"] == batch), key=lambda r: best_row(r, "latency_ms_p50")):
        level = r.get("level")
        lines.append(f"| {r['config']} | {r.get('calibration_method') or '-'} | {r.get('calib_images') or '-'} | "
                     f"{r.get('nodes_to_exclude') or '-'} | {'-' if level in (None, '') else level} | "
                     f"{best_row(r, 'latency_ms_p50'):.3f} | {fmt(p99(r))} | "
                     f"{best_row(r, 'throughput_ips'):,.0f} | {r['map50_95']:.4f} | "
                     f"{r.get('exact_map50_95', float('nan')):.4f} | {r['map50']:.4f} |")
    return "\n".join(lines)


def point_record(model, name, key, root=REPO) -> dict:
    return json.loads((root / "results" / model / "points" / f"{name}.{key}.json").read_text())


def describe(rows, choice) -> str:
    """Speed-up over FP16 and mAP drop of `choice`, from rows measured in the same sweep run."""
    lines, other_level = [], None
    for batch in sorted({r["batch"] for r in rows}):
        at = by_config(rows, batch)
        if choice not in at:
            continue
        c = at[choice]
        f, same_level = fp16_baseline(at, c)
        if f is None:
            continue
        other_level = None if same_level else (f.get("level"), c.get("level"))
        lat = best_row(f, "latency_ms_p50") / best_row(c, "latency_ms_p50")
        thr = best_row(c, "throughput_ips") / best_row(f, "throughput_ips")
        lines.append(f"| {batch} | {best_row(c, 'latency_ms_p50'):.3f} | {best_row(f, 'latency_ms_p50'):.3f}"
                     f" | {lat:.2f}x | {best_row(c, 'throughput_ips'):,.0f} | {thr:.2f}x |")
    text = ("| batch | latency p50 ms | FP16 p50 ms | latency speed-up | img/s | throughput speed-up |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines))
    if other_level:
        text += (f"\n\nFP16 was built at builder level {other_level[0]} and `{choice}` at level {other_level[1]}; no FP16 "
                 f"engine at level {other_level[1]} is in this sweep, so part of this speed-up is the builder level, "
                 f"not INT8.")
    return text


def guide(rec: dict) -> str:
    r = rec["recipe"]
    q = rec.get("quantization") or {}
    plan = rec["plan"]
    lines = [f"- Recipe: `{rec['name']}` ({rec['precision']}), key `{rec['key']}`; settings as YAML in "
             f"`results/{rec['model']}/chosen.yaml`.",
             f"- Measured with TensorRT {rec['trt_version']} on {rec['gpu']}"
             + (f", ModelOpt {q['modelopt_version']}" if q else "") + ".",
             f"- Builder flags: `{' '.join(plan['flags'])} --builderOptimizationLevel={r['builder_optimization_level']}"
             f" --minShapes=images:{r['min_batch']}x3x{r['imgsz']}x{r['imgsz']}"
             f" --optShapes=images:{r['opt_batch']}x3x{r['imgsz']}x{r['imgsz']}"
             f" --maxShapes=images:{r['max_batch']}x3x{r['imgsz']}x{r['imgsz']}`"]
    if q:
        lines.append(f"- Quantization: ModelOpt `{q['command']}` after calibrating with "
                     f"`--calibration_method {r['calibration_method']}` on {r['calib_images']} images "
                     f"(seed {r['calib_seed']}); {q['nodes']['quantized_nodes']} nodes INT8, "
                     f"{q['nodes']['QuantizeLinear']} Q/DQ pairs.")
    return "\n".join(lines)


def selection_section(rows: list[dict], choice: dict) -> list[str]:
    small, large, chosen = choice["small_batch"], choice["large_batch"], choice["latency"]
    at_small = by_config(rows, small)

    def accuracy(config: str) -> str:
        m = at_small[config]["map50_95"]
        return f"mAP50-95 {m:.4f} ({(m - choice['fp16_map50_95']) * 100:+.2f} points vs FP16"

    md = []
    if chosen:
        md += [f"**Chosen (latency): `{chosen}`**, {accuracy(chosen)}).", "",
               describe(rows, chosen), "",
               f"**Throughput-optimal at batch {large}: `{choice['throughput']}`**.", ""]
        if choice["throughput"] and choice["throughput"] != chosen:
            md += [describe(rows, choice["throughput"]), ""]
    else:
        md += [f"**Chosen: `fp16`**: no INT8-mixed configuration is within {choice['budget']} mAP points of FP16, so "
               f"FP16 stays the choice at this budget (`make report BUDGET=...` applies another).", ""]
    if choice.get("closest") and choice["closest"] != chosen:
        md += [f"Most accurate INT8-mixed configuration: `{choice['closest']}`, {accuracy(choice['closest'])}; "
               f"the budget it needs):", "",
               describe(rows, choice["closest"]), ""]
    md += ["Against the Ultralytics 8.4 recipes:", ""]
    for ref in ULTRALYTICS:
        if ref in at_small:
            md += [f"`{ref}`, {accuracy(ref)}):", "",
                   describe(rows, ref), ""]
    return md


def deploy_section(model: str, rec: dict) -> list[str]:
    return ["## Reproduce and deploy", "", guide(rec), "",
            "Commands (on a machine with TensorRT and a GPU; the quantization runs on the CPU):", "", "```sh",
            "pip install -r requirements.txt            # CPU half: ModelOpt, ultralytics, ONNX Runtime",
            f"cp results/{model}/chosen.yaml recipes/{model}/chosen.yaml",
            *([f"make quantize RECIPE=recipes/{model}/chosen.yaml CALIB_DIR=path/to/calib/images"]
              if rec["precision"] == "int8-qdq" else []),
            f"make bench accuracy RECIPE=recipes/{model}/chosen.yaml EVAL_DIR=path/to/coco/val",
            "```", "",
            "- Another GPU: engines and timing caches are tied to the GPU and TensorRT version; keep the quantized "
            "ONNX (it is portable) and rerun `make engine bench` there. The record key includes the GPU name, so "
            "nothing is reused by mistake.",
            "- TensorRT 10: the same flags work (`--fp16 --int8` with the Q/DQ model); ModelOpt may keep "
            "`high_precision_dtype: fp16` (8.6 needs fp32). Recheck the attention exclusion: 10.x has INT8 kernels "
            "for the C2PSA `pe` conv, so a recipe without it may be faster there.",
            "- TensorRT 11: strongly typed only. `make quantize TRT_VERSION=11` bakes FP16 into the Q/DQ model "
            "(high_precision_dtype fp16) and the engine is built with `--stronglyTyped`; layer-precision flags and "
            "implicit INT8 (`int8-implicit`) no longer exist (tools/trt_plan.py).", ""]


def cost(sweep: dict) -> str:
    """What the sweep cost: its wall time (summed over resumed runs), the GPU stages summed over the points (more than
    the wall time where accuracy overlapped the next build), and the run's note."""
    runs = sweep.get("run_seconds") or ([sweep["seconds"]] if sweep.get("seconds") else [])
    text = (f"sweep wall time {sum(runs)} s" + (f" over {len(runs)} resumed runs ({', '.join(map(str, runs))} s)"
                                                if len(runs) > 1 else "")) if runs else "sweep time not recorded"
    spent = sweep.get("stage_seconds") or {}
    if spent.get("total"):
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in spent.items() if k != "total")
        text += f"; stages {spent['total']:.0f} s summed over the points ({parts}"
        text += ", accuracy overlapping the next build)" if sweep.get("overlap") else ")"
    return text + (f"; {sweep['note']}" if sweep.get("note") else "")


def write_report(model: str, budget: float, root: Path = REPO) -> Path:
    out = root / "results" / model
    sweep_path = out / "sweep.json"
    if not sweep_path.is_file():
        raise UserError(f"{sweep_path}: no sweep results; run `make sweep` first")
    sweep = json.loads(sweep_path.read_text())
    rows = sweep["rows"]
    choice = select(rows, budget)
    small, large = choice["small_batch"], choice["large_batch"]
    pareto_plot(rows, small, "latency_ms_p50", out / "pareto_latency_b1.png",
                f"{model}: latency at batch {small} vs mAP50-95", f"GPU latency p50 at batch {small} (ms)")
    pareto_plot(rows, large, "throughput_ips", out / "pareto_throughput_b32.png",
                f"{model}: throughput at batch {large} vs mAP50-95", f"images/s at batch {large}")
    first = rows[0]
    chosen = choice["latency"]
    md = [f"# {model}: INT8/FP16 configuration search", "",
          f"GPU: {first['gpu']}; TensorRT {first['tensorrt']}; {sweep['points']} configurations ({sweep['design']} "
          f"grid `{sweep['grid']}`); {cost(sweep)}. mAP on the COCO val2017 evaluation set named "
          f"in each record; calibration on disjoint images. Timings are trtexec GPU compute medians (CUDA graph or not, "
          f"whichever is faster) measured in this one run.", "",
          *([f"**Partial sweep: {sweep['points']} of {sweep['points_planned']} planned configurations were measured**"
             f" (the run stopped before the rest); the selection below covers only these.", ""]
            if not sweep.get("complete", True) else []),
          "## Selection", "",
          f"Rule: the fastest INT8-mixed configuration at batch {small} whose mAP50-95 is within {budget} mAP points of "
          f"the FP16 engine ({choice['fp16_map50_95']:.4f}); also the configuration with the highest throughput at "
          f"batch {large} under the same budget.", ""]
    md += selection_section(rows, choice)
    deployed = chosen or "fp16"
    rec = point_record(model, deployed, by_config(rows, small)[deployed]["key"], root)
    from tools.recipe import dump, from_dict

    with atomic_path(out / "chosen.yaml") as tmp:
        tmp.write_text(f"# chosen by `make report` (rule above); copy to recipes/{model}/ to rebuild\n"
                       + dump(from_dict(rec["recipe"])))
    md += deploy_section(model, rec)
    md += ["## Plots", "", "![latency](pareto_latency_b1.png) ![throughput](pareto_throughput_b32.png)", "",
           f"## All configurations, batch {small}", "", table(rows, small), "",
           f"## All configurations, batch {large}", "", table(rows, large), ""]
    if sweep.get("failures"):
        md += ["## Failed points", ""] + [f"- `{k}`: {v}" for k, v in sweep["failures"].items()] + [""]
    write_text(out / "REPORT.md", "\n".join(md))
    write_text(out / "selection.json", json.dumps(choice, indent=2) + "\n")
    return out / "REPORT.md"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__)
    ap.add_argument("--model", default="yolo11n")
    ap.add_argument("--budget", type=float, default=0.5, help="mAP50-95 points below FP16 that INT8 may lose")
    args = ap.parse_args(argv)
    print(f"wrote {write_report(args.model, args.budget)}")


if __name__ == "__main__":
    run_main(main)
