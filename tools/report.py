"""<results>/<model>/REPORT.md: the sweep table, Pareto plots, the chosen configuration and how to deploy it.

Selection rule (stated in the report): among the INT8-mixed configurations measured at the final builder level, the
fastest at the latency profile (smallest batch) whose mAP50-95 is within BUDGET mAP points of the FP16 engine of the
same level and profile and which is faster than it, and the one with the highest throughput at the throughput profile
(largest batch) under the same conditions. The rule reads the accuracy of one half of the evaluation images (half A); the other half (B) confirms
the drop, and the report says so when the halves disagree by more than engine-to-engine noise. Every speed-up is
against FP16 built at the same level and profile and timed in the same run. Both choices are set against the two
Ultralytics recipes. Where the sweep screened at a cheaper level, the report shows how well it ranked the front.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from tools.core.cli import add_results, non_negative_number
from tools.core.errors import UserError, run_main
from tools.core.files import REPO, atomic_path
from tools.core.grid import load_grid
from tools.core.layout import Layout
from tools.core.recipe import dump, from_dict
from tools.core.record import PointRecord, read_json
from tools.core.sweep_table import Table, best, p99, pareto, selection_map
from tools.sizes import markdown, size_table
from tools.summary import fmt
from tools.yolo.layers import read_by_block

ULTRALYTICS = ("int8-implicit", "int8-ultralytics")
NOISE = 0.2  # mAP points: how far the same configuration moved between freshly built engines (README)


def select(table: Table, budget: float) -> dict:
    """Apply the stated rule at the final level; budget in mAP points (0.5 = 0.005 mAP50-95)."""
    lat, thr = table.latency(), table.throughput()
    if "fp16" not in lat or "fp16" not in thr:
        raise UserError(f"the sweep has no fp16 engine at level {table.final} in both profiles: include "
                        f"recipes/fp16.yaml in the grid's references")
    int8 = lambda at: [c for c, r in at.items() if r["precision"] in ("int8-qdq", "int8-implicit")]  # noqa: E731
    within = lambda at: [c for c in int8(at)  # noqa: E731
                         if selection_map(at[c]) >= selection_map(at["fp16"]) - budget / 100]
    # an INT8 engine slower than FP16 in its profile is no choice, however accurate
    faster = [c for c in within(lat) if best(lat[c], "latency_ms_p50") < best(lat["fp16"], "latency_ms_p50")]
    wider = [c for c in within(thr) if best(thr[c], "throughput_ips") > best(thr["fp16"], "throughput_ips")]
    fastest = min(faster, key=lambda c: best(lat[c], "latency_ms_p50"), default=None)
    widest = max(wider, key=lambda c: best(thr[c], "throughput_ips"), default=None)
    closest = max(int8(lat), key=lambda c: selection_map(lat[c]), default=None)
    return {"budget": budget, "level": table.final, "latency_profile": table.latency_profile,
            "throughput_profile": table.throughput_profile, "small_batch": table.small, "large_batch": table.large,
            "halves": "map50_95_a" in lat["fp16"], "latency": fastest, "throughput": widest, "closest": closest}


def drop(at: dict[str, dict], config: str, half: str | None) -> float:
    """mAP50-95 points `config` loses against FP16 in the same table (on one half, or all images)."""
    key = (lambda r: selection_map(r, half)) if half else (lambda r: r["map50_95"])
    return (key(at["fp16"]) - key(at[config])) * 100


def accuracy_text(at: dict[str, dict], config: str) -> str:
    r = at[config]
    text = f"mAP50-95 {r['map50_95']:.4f} ({-drop(at, config, None):+.2f} points vs FP16 on all images"
    if "map50_95_a" in r:
        a, b = drop(at, config, "a"), drop(at, config, "b")
        text += f"; {-a:+.2f} on half A, which chose it, {-b:+.2f} on half B, which confirms it"
        if abs(a - b) > NOISE:
            text += f" - the halves disagree by {abs(a - b):.2f} points, more than the {NOISE} of engine-to-engine noise"
    return text + ")"


def speedup_table(table: Table, config: str, level: int) -> str:
    """Speed-up of `config` over FP16 built at the same level and profile, per profile and batch, same run."""
    lines = ["| profile | batch | latency p50 ms | FP16 p50 ms | latency speed-up | img/s | FP16 img/s | "
             "throughput speed-up |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["profile"], r["batch"]) for r in table.rows if r["level"] == level},
                  key=lambda k: (k[1], k[0]))
    for profile, batch in keys:
        at = table.at(level, profile, batch)
        if config not in at or "fp16" not in at:
            continue
        c, f = at[config], at["fp16"]
        lines.append(f"| {profile} | {batch} | {best(c, 'latency_ms_p50'):.3f} | {best(f, 'latency_ms_p50'):.3f} | "
                     f"{best(f, 'latency_ms_p50') / best(c, 'latency_ms_p50'):.2f}x | {best(c, 'throughput_ips'):,.0f}"
                     f" | {best(f, 'throughput_ips'):,.0f} | "
                     f"{best(c, 'throughput_ips') / best(f, 'throughput_ips'):.2f}x |")
    return "\n".join(lines)


def selection_section(table: Table, choice: dict) -> list[str]:
    lat, level = table.latency(), table.final
    md = []
    for role, config, at, profile in (("latency", choice["latency"], lat, table.latency_profile),
                                      ("throughput", choice["throughput"], table.throughput(), table.throughput_profile)):
        title = "Chosen (latency" if role == "latency" else "Throughput-optimal (batch " + str(table.large)
        if config:
            md += [f"**{title}, profile `{profile}`): `{config}`**, {accuracy_text(at, config)}.", ""]
            if role == "latency" or config != choice["latency"]:
                md += [speedup_table(table, config, level), ""]
        else:
            md += [f"**{title}, profile `{profile}`): `fp16`**: no INT8-mixed configuration at level {level} is both "
                   f"within {choice['budget']} mAP points of FP16 and faster than it in this profile, so FP16 stays "
                   f"the choice at this budget (`make report BUDGET=...` applies another).", ""]
    if choice["closest"] and choice["closest"] != choice["latency"]:
        md += [f"Most accurate INT8-mixed configuration: `{choice['closest']}`, {accuracy_text(lat, choice['closest'])}"
               f":", "", speedup_table(table, choice["closest"], level), ""]
    refs = [r for r in ULTRALYTICS if r in lat]
    if refs:
        md += ["Against the Ultralytics 8.4 recipes:", ""]
        for ref in refs:
            md += [f"`{ref}`, {accuracy_text(lat, ref)}:", "", speedup_table(table, ref, level), ""]
    return md


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's rank correlation (tau-a): 1 when two orderings agree on every pair."""
    n = len(xs)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        return float("nan")
    score = sum((xs[i] - xs[j]) * (ys[i] - ys[j]) > 0 for i, j in pairs) - \
        sum((xs[i] - xs[j]) * (ys[i] - ys[j]) < 0 for i, j in pairs)
    return score / len(pairs)


def screening_section(table: Table, screen_level: int | None) -> list[str]:
    """How the cheaper screening level ranked the configurations measured at both levels."""
    if screen_level is None or screen_level == table.final or screen_level not in table.levels:
        return []
    md = [f"## Screening at level {screen_level} against level {table.final}", "",
          f"Every configuration was first built and timed at builder level {screen_level}; the front, FP16 and the "
          f"references were measured again at level {table.final}, in the same run.", "",
          "| profile | batch | configurations | Kendall tau (speed order) | level-final / level-screen time |",
          "|---|---|---|---|---|"]
    for profile, batch, field in ((table.latency_profile, table.small, "latency_ms_p50"),
                                  (table.throughput_profile, table.large, "latency_ms_p50")):
        low, high = table.at(screen_level, profile, batch), table.at(table.final, profile, batch)
        both = sorted(set(low) & set(high))
        ratios = [best(high[c], field) / best(low[c], field) for c in both]
        tau = kendall_tau([best(low[c], field) for c in both], [best(high[c], field) for c in both])
        md.append(f"| {profile} | {batch} | {len(both)} | {tau:.2f} | {min(ratios, default=0):.2f}-"
                  f"{max(ratios, default=0):.2f} |")
    return md + [""]


def pareto_plot(table: Table, at: dict[str, dict], field: str, out: Path, title: str, xlabel: str, layout: Layout):
    import matplotlib  # optional: not installed on the GPU side

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    xy = {c: (best(r, field), r["map50_95"] * 100) for c, r in at.items()}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"fp16": "tab:blue", "int8-qdq": "tab:orange", "int8-implicit": "tab:green"}
    for name, (x, y) in xy.items():
        ax.scatter(x, y, color=colours.get(at[name]["precision"], "grey"), s=30)
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    sign = 1 if field.startswith("latency") else -1  # the cost pareto() minimises: latency, or minus throughput
    front = sorted(pareto({c: (sign * x, y) for c, (x, y) in xy.items()}), key=lambda c: xy[c][0])
    ax.plot([xy[c][0] for c in front], [xy[c][1] for c in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mAP50-95 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(layout.guard(out)) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def all_configurations(table: Table, level: int, profile: str, batch: int) -> str:
    lines = ["| configuration | calibration | images | kept in float | p50 ms | p99 ms | img/s | mAP50-95 | half A | "
             "half B | exact-subset mAP50-95 |", "|" + "---|" * 11]
    at = table.at(level, profile, batch)
    for c in sorted(at, key=lambda c: best(at[c], "latency_ms_p50")):
        r = at[c]
        lines.append(f"| {c} | {r.get('calibration_method') or '-'} | {r.get('calib_images') or '-'} | "
                     f"{r.get('nodes_to_exclude') or '-'} | {best(r, 'latency_ms_p50'):.3f} | "
                     f"{fmt(p99(r), '.3f')} | {best(r, 'throughput_ips'):,.0f} | "
                     f"{r['map50_95']:.4f} | {fmt(r.get('map50_95_a'), '.4f')} | {fmt(r.get('map50_95_b'), '.4f')} | "
                     f"{fmt(r.get('exact_map50_95'), '.4f')} |")
    return "\n".join(lines)


def recorded_command(layout: Layout, rec: PointRecord) -> str:
    """The build command the record's log begins with, as a trtexec user would type it: the fallback named trtexec,
    the run's own paths (a GPU machine's scratch folders) replaced by the record's."""
    log = layout.resolve(rec["build"]["log"])
    if not log.is_file():
        return "(build log not kept)"
    args = shlex.split(log.read_text().splitlines()[0].removeprefix("# "))
    if "tools.trtexec_py" in args:
        args = ["trtexec"] + args[args.index("tools.trtexec_py") + 1:]
    paths = {"onnx": rec["onnx"], "saveEngine": rec["build"]["engine"]}
    out = []
    for arg in args:
        m = re.match(r"--(\w+)=(.*)", arg)
        if m and m.group(1) in paths:
            arg = f"--{m.group(1)}={paths[m.group(1)]}"
        elif m and m.group(1) in ("timingCacheFile", "calib"):
            arg = f"--{m.group(1)}={Path(m.group(2)).name}"
        out.append(arg)
    return shlex.join(out)


def deploy_section(layout: Layout, rec: PointRecord) -> list[str]:
    model, r, q = layout.model, rec["recipe"], rec.get("quantization") or {}
    lines = [f"- Recipe `{rec['name']}` ({rec['precision']}), measured with TensorRT {rec['trt_version']} on "
             f"{rec['gpu']}, builder level {rec['level']}, profile `{rec['profile']['name']}`"
             + (f", ModelOpt {q['modelopt_version']}" if q else "") + "; as YAML in `chosen.yaml`.",
             f"- Build command (from the record's log): `{recorded_command(layout, rec)}`"]
    if q:
        lines.append(f"- Quantization: ModelOpt `{q['command']}`, its scales from the calibration cache "
                     f"`{q['calibration_cache']}` ({r['calibration_method']} on {r['calib_images']} images, seed "
                     f"{r['calib_seed']}); {q['nodes']['quantized_nodes']} nodes INT8.")
    # chosen.yaml names its model, so it is a recipe of that size alone: it goes beside the size's name, and make
    # runs it on that size (MODEL=, which is yolo11n unless given)
    size = "" if model == "yolo11n" else f" MODEL={model}"
    return ["## Reproduce and deploy", "", *lines, "",
            "Commands (on a machine with TensorRT and a GPU; the quantization runs on the CPU):", "", "```sh",
            f"mkdir -p recipes/{model}",  # a clean clone has no such folder: recipes/*.yaml are the sizeless ones
            f"cp {layout.out.relative_to(layout.root) if layout.out.is_relative_to(layout.root) else layout.out}"
            f"/chosen.yaml recipes/{model}/chosen.yaml",
            *([f"make quantize RECIPE=recipes/{model}/chosen.yaml{size} CALIB_DIR=path/to/calib/images"]
              if rec["precision"] == "int8-qdq" else []),
            f"make bench accuracy RECIPE=recipes/{model}/chosen.yaml{size} EVAL_DIR=path/to/coco/val",
            "```", "",
            "- Another GPU or TensorRT: engines are tied to both; keep the quantized ONNX (it is portable) and rerun "
            "`make engine bench` there. Record keys include the GPU name and TensorRT version, so nothing is reused "
            "by mistake.",
            "- TensorRT 10: the same flags work (`--fp16 --int8` with the Q/DQ model).",
            "- TensorRT 11: strongly typed only. `make quantize TRT_VERSION=11` bakes FP16 into the Q/DQ model and the "
            "engine is built with `--stronglyTyped`; layer-precision flags and implicit INT8 (`int8-implicit`) no "
            "longer exist (tools/trt_plan.py).", ""]


def cost(sweep: dict) -> str:
    """What the sweep cost: wall time (summed over resumed runs) against the stage time summed over the points,
    whose ratio is what running points side by side on the GPUs bought."""
    runs = sweep.get("run_seconds") or []
    text = (f"sweep wall time {sum(runs)} s" + (f" over {len(runs)} resumed runs ({', '.join(map(str, runs))} s)"
                                                if len(runs) > 1 else "")) if runs else "sweep time not recorded"
    if sweep.get("gpus"):
        text += f" on {len(sweep['gpus'])} GPU(s), {sweep.get('jobs_per_gpu', 1)} build(s) per GPU at a time"
    spent = sweep.get("stage_seconds") or {}
    if spent.get("total"):
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in spent.items() if k != "total")
        text += f"; stages {spent['total']:.0f} s summed over the engines ({parts})"
    return text + (f"; {sweep['note']}" if sweep.get("note") else "")


def profile_section(layout: Layout, table: Table) -> list[str]:
    """Where INT8 loses its 2x at the throughput profile, from `make profile`'s by-block table, where it exists."""
    folder = layout.layer_tables(table.throughput_profile, table.final)
    if not (folder / "by-block.csv").is_file():
        return []
    rows = read_by_block(folder / "by-block.csv")
    total = rows.pop("all")
    engines = [k[len("speedup_"):] for k in total if k.startswith("speedup_")]
    md = [f"## Where the INT8 speed-up stops (per-layer profile, profile `{table.throughput_profile}`, level "
          f"{table.final})", "",
          f"Sums of per-layer medians (TensorRT's profiler synchronises after every layer: read ratios, not absolute "
          f"times); details in [profile.md]({folder.relative_to(layout.out)}/profile.md).", "",
          "| engine | layer-sum speed-up | conv speed-up | reformat ms (FP16: "
          f"{float(total['reformat_ms_fp16']):.3f}) | Q/DQ ms | ms above half of FP16 | ceiling set by the convolutions "
          "| blocks furthest above half |",
          "|---|---|---|---|---|---|---|---|"]
    for e in engines:
        worst = sorted(rows, key=lambda b: -float(rows[b][f"above_2x_ms_{e}"]))[:3]
        md.append(f"| {e} | {float(total[f'speedup_{e}']):.2f}x | {float(total[f'conv_speedup_{e}']):.2f}x | "
                  f"{float(total[f'reformat_ms_{e}']):.3f} | {float(total[f'qdq_ms_{e}']):.3f} | "
                  f"{float(total[f'above_2x_ms_{e}']):.3f} | {float(total[f'conv_bound_speedup_{e}']):.2f}x | "
                  + ", ".join(f"{b} (+{float(rows[b][f'above_2x_ms_{e}']):.3f})" for b in worst) + " |")
    return md + [""]


def sizes_section(layout: Layout) -> list[str]:
    """INT8 over FP16 by model size (tools.sizes), where the results root holds other models' sweeps too."""
    if len(list(layout.results.glob("*/sweep.json"))) < 2:
        return []
    try:
        rows, _ = size_table(layout.results, None, "int8-qdq")
    except UserError:
        return []
    if len({r["model"] for r in rows}) < 2:
        return []
    return [markdown(rows, [], "int8-qdq", "## INT8 over FP16 by model size (`make sizes`)")]


def end_to_end_section(layout) -> list[str]:
    """`make e2e`'s table (its own run, FP16 beside INT8), where one was committed, and the annotated predictions."""
    e2e = layout.e2e("md")
    if not e2e.is_file():
        return []
    body = e2e.read_text().split("\n", 1)[1].strip()  # its title becomes this section's
    shown = sorted(layout.out.glob("predict/*/*.jpg"))
    pictures = [f"![{p.parent.name} {p.stem}]({p.relative_to(layout.out)})" for p in shown]
    return ["## End to end (`make e2e`, `make predict`)", "", body, "",
            "Where the host's CPU stages dominate, whole-loop ratios drift between runs of the same engines: the "
            "README's \"Deploy: end to end\" says how far on the machine above.", "", *([" ".join(pictures), ""] if pictures else [])]


def unmeasured_references(sweep: dict, table: Table) -> str:
    """' Not measured at level L: ...' for the grid's references the run ended before measuring at the final level."""
    try:
        refs = [r.name for r in load_grid(sweep["grid"]).references]
    except (UserError, KeyError):  # the grid moved or changed since: nothing to name
        return ""
    missing = [r for r in refs if r not in table.latency() or r not in table.throughput()]
    return f" Not measured at level {table.final} in this run: {', '.join(missing)}." if missing else ""


def write_report(layout: Layout, budget: float) -> Path:
    sweep_path = layout.sweep_json
    if not sweep_path.is_file():
        raise UserError(f"{sweep_path}: no sweep results; run `make sweep` first (RESULTS= names where it wrote)")
    sweep = read_json(sweep_path, "sweep table")
    kept = {p.name.split(".")[-2] for p in layout.points.glob("*.json")}
    lost = next((r["config"] for r in sweep["rows"] if r["key"] not in kept), None)
    if lost is not None:  # the report reads the chosen point's record: check before writing any of it
        raise UserError(f"{sweep_path}: names point {lost!r}, whose record is not in {layout.points}; copy the "
                        f"sweep's points/ folder along with sweep.json (or rerun `make sweep`)")
    if any(r.get("random_weights") for r in sweep["rows"]):
        raise UserError(f"{sweep_path}: the model has random weights (speed only), so a choice by accuracy means "
                        f"nothing; read the speed columns of sweep.csv, or export the trained .pt and sweep again")
    table = Table(sweep["rows"], sweep.get("final_level"))
    choice = select(table, budget)
    out, model, level = layout.out, layout.model, table.final
    pareto_plot(table, table.latency(), "latency_ms_p50", out / "pareto_latency.png",
                f"{model}: latency (profile {table.latency_profile}, batch {table.small}, level {level}) vs mAP50-95",
                f"GPU latency p50 at batch {table.small} (ms)", layout)
    pareto_plot(table, table.throughput(), "throughput_ips", out / "pareto_throughput.png",
                f"{model}: throughput (profile {table.throughput_profile}, batch {table.large}, level {level}) vs "
                f"mAP50-95", f"images/s at batch {table.large}", layout)
    first = sweep["rows"][0]
    md = [f"# {model}: INT8/FP16 configuration search", "",
          f"GPU: {first['gpu']}; TensorRT {first['tensorrt']}; {sweep['points']} engines ({sweep['design']} grid "
          f"`{sweep['grid']}`); {cost(sweep)}. Timings are GPU compute medians (CUDA graph or not, whichever is faster)"
          f" measured in this one run; each engine is timed at the batch its profile was built for. mAP on the COCO "
          f"val2017 evaluation set named in each record; calibration on disjoint images.", "",
          *(["**Partial sweep** (failures or a stop before the end): the selection covers only what was measured."
             + unmeasured_references(sweep, table), ""] if not sweep.get("complete", True) else []),
          "## Selection", "",
          f"Rule: among the INT8-mixed configurations built at builder level {level}, the fastest at profile "
          f"`{table.latency_profile}` (batch {table.small}) whose mAP50-95 "
          + ("on half A of the evaluation images (half B confirms it) " if choice["halves"] else
             "(these records have no evaluation halves: the rule reads all images) ")
          + f"is within {budget} mAP points of the FP16 engine of the same level and profile, and which is faster "
            f"than that engine; likewise the highest throughput at profile `{table.throughput_profile}` (batch "
            f"{table.large}).", ""]
    md += selection_section(table, choice)
    deployed = choice["latency"] or "fp16"
    rec = read_json(layout.records_keyed(table.latency()[deployed]["key"])[0])

    layout.write_text(out / "chosen.yaml", f"# chosen by `make report` (rule in REPORT.md); copy to recipes/{model}/ "
                                           f"to rebuild\n" + dump(from_dict(rec["recipe"])))
    md += deploy_section(layout, rec)
    md += profile_section(layout, table)
    md += screening_section(table, sweep.get("screen_level"))
    md += sizes_section(layout)
    md += end_to_end_section(layout)
    md += ["## Plots", "", "![latency](pareto_latency.png) ![throughput](pareto_throughput.png)", ""]
    for lvl in reversed(table.levels):
        for profile, batch in ((table.latency_profile, table.small), (table.throughput_profile, table.large)):
            md += [f"## All configurations: level {lvl}, profile `{profile}`, batch {batch}", "",
                   all_configurations(table, lvl, profile, batch), ""]
    if sweep.get("failures"):
        md += ["## Failed points", ""] + [f"- `{k}`: {v}" for k, v in sweep["failures"].items()] + [""]
    layout.write_text(out / "REPORT.md", "\n".join(md))
    layout.write_json(out / "selection.json", choice)
    return out / "REPORT.md"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="yolo11n")
    ap.add_argument("--budget", type=non_negative_number, default=0.5,
                    help="mAP50-95 points below FP16 that INT8 may lose")
    add_results(ap)
    args = ap.parse_args(argv)
    layout = Layout(args.model, REPO, Path(args.results).resolve(), args.overwrite)
    print(f"wrote {write_report(layout, args.budget)}")


if __name__ == "__main__":
    run_main(main)
