"""The results table of `make all`: <results>/<model>/summary.{json,csv,md} from what this run's records hold.

Only results measured on the evaluation set at hand count (records carry its content key), so a table never mixes
in numbers from other images or annotations. Without TensorRT a run has no engine records: the summary then shows
the ONNX Runtime scores it measured, and says where the published GPU table is and what measured it.
summary.json keys: model, eval (images, key), onnxrt ({kind: scores}), gpu, tensorrt, engines (one object per engine
and batch: name, profile, level, batch, latency_ms_p50, latency_ms_p99, throughput_ips, map50_95, map50, engine_mb,
build_s; CUDA-graph timings and the exact-annotation subset ride along), speed_only (random-weight model).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.core.cli import add_model
from tools.core.errors import run_main
from tools.core.files import REPO, eval_set, to_csv
from tools.core.layout import Layout
from tools.core.recipe import load
from tools.core.record import engine_records, engine_rows, newest_per, read_json, read_records
from tools.core.setup import add_setup_args, setup_from_args
from tools.pipeline import Point, check_names, onnxrt_results
from tools.yolo.graph import is_random_weights


def newest_onnxrt(layout: Layout, eval_key: str) -> dict[str, dict]:
    """ONNX Runtime results on this evaluation set, the newest per kind (fp32 or the recipe's Q/DQ model)."""
    found = [res for res in read_records(layout.onnxrt) if res.get("eval", {}).get("key") == eval_key]
    return newest_per(found, lambda res: res["kind"])


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def engine_table(engines: list[dict], speed_only: bool = False) -> list[str]:
    cols = ["engine", "profile", "level", "batch", "p50 ms", "p99 ms", "img/s", "p50 ms (graph)", "p99 ms (graph)",
            "img/s (graph)", "mAP50-95", "mAP50", "engine MB", "build s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in engines:
        exact = f" ({r['exact_map50_95']:.4f})" if r.get("exact_map50_95") is not None else ""
        plain = {k: None if r.get("cuda_graph") else r[k] for k in ("latency_ms_p50", "latency_ms_p99", "throughput_ips")}
        graph = {k: r.get(f"{k}_cuda_graph", r[k] if r.get("cuda_graph") else None)
                 for k in ("latency_ms_p50", "latency_ms_p99", "throughput_ips")}
        lines.append(f"| {r['name']} | {r['profile']} | {r['level']} | {r['batch']} | "
                     f"{fmt(plain['latency_ms_p50'], '.3f')} | {fmt(plain['latency_ms_p99'], '.3f')} | "
                     f"{fmt(plain['throughput_ips'], ',.0f')} | {fmt(graph['latency_ms_p50'], '.3f')} | "
                     f"{fmt(graph['latency_ms_p99'], '.3f')} | {fmt(graph['throughput_ips'], ',.0f')} | "
                     f"{'-' if speed_only else format(r['map50_95'], '.4f') + exact} | "
                     f"{'-' if speed_only else format(r['map50'], '.4f')} | {r['engine_mb']:.1f} | "
                     f"{fmt(r['build_s'], '.0f')} |")
    return lines


def markdown(summary: dict) -> str:
    model, ev = summary["model"], summary["eval"]
    out = [f"# {model}: results of this run", "",
           f"Evaluation set: {ev['images']} images in `{ev['dir']}` (content key `{ev['key']}`)."]
    if summary.get("speed_only"):
        out += ["", f"**Speed only**: {model} has random weights (built from its ultralytics YAML); its mAP means "
                    "nothing and is not shown as a result."]
    if summary["onnxrt"] and not summary.get("speed_only"):
        out += ["", "ONNX Runtime (CPU or CUDA execution provider), the models the engines are built from:", "",
                "| model | mAP50-95 | mAP50 | exact-subset mAP50-95 |", "|---|---|---|---|"]
        out += [f"| {kind} | {r['map50_95']:.4f} | {r['map50']:.4f} | {fmt(r.get('exact_map50_95'), '.4f')} |"
                for kind, r in summary["onnxrt"].items()]
    if summary["engines"]:
        out += ["", f"TensorRT {summary['tensorrt']} on {summary['gpu']}: latency is GPU compute median/p99 without "
                    "transfers; `profile` names the engine (static batch 1 or 32, ...), `level` its builder "
                    "optimization level; CUDA-graph columns replay the same engine as a CUDA graph.", ""]
        out += engine_table(summary["engines"], speed_only=summary.get("speed_only", False))
    else:
        out += ["", "No engine was built or timed in this run (TensorRT is not installed here, or the GPU stages did "
                    "not run)."]
        if summary.get("published"):
            p = summary["published"]
            out += [f"The published GPU results are in `{p['path']}`: measured on {p['gpu']} with TensorRT "
                    f"{p['tensorrt']} ({p['images']} evaluation images); they are not results of this run."]
    return "\n".join(out) + "\n"


def published(model: str, root: Path = REPO) -> dict | None:
    """Where the committed GPU table lives and what measured it (for a run that measured none itself)."""
    path = Layout(model, root, root / "results").summary("json")
    if not path.is_file():
        return None
    s = read_json(path, "summary")
    return {"path": str(path.relative_to(root)), "gpu": s.get("gpu"), "tensorrt": s.get("tensorrt"),
            "images": s.get("eval", {}).get("images", s.get("eval_images"))}


def ran_results(recipes, setup) -> dict:
    """What summarize's `ran` takes, for recipes as `setup` runs them (Setup.adapt): each one's settings (what its
    records' keys hash; a changed description still names the same engine) and the ONNX Runtime result files of its
    run, found by their keys."""
    return {r.name: (r.settings(), onnxrt_results(Point(r, setup))) for r in recipes}


def summarize(layout: Layout, names: list[str], eval_dir, eval_limit: int | None = None,
              speed_only: bool = False, ran: dict | None = None) -> dict:
    """`ran`: {recipe name: (its settings as run, the ONNX Runtime result files it stands on)}: the table then holds
    those results only, not the newest of any recipe that once had the name (main passes it)."""
    ev = eval_set(eval_dir, eval_limit)
    records = engine_records(layout, names, ev["key"], ran and {n: r for n, (r, _) in ran.items()})
    first = records[0] if records else {}
    if ran is None:
        onnxrt = newest_onnxrt(layout, ev["key"])
    else:
        onnxrt = {res["kind"]: res for _, paths in ran.values() for res in map(read_json, paths)}
    return {"model": layout.model, "eval": {"dir": str(eval_dir), "images": ev["count"], "key": ev["key"]},
            "speed_only": speed_only,
            "onnxrt": {k: {m: v[m] for m in ("map50_95", "map50", "images")} |
                       {"exact_map50_95": v.get("exact", {}).get("map50_95")} for k, v in onnxrt.items()},
            "gpu": first.get("gpu"), "tensorrt": first.get("trt_version"),
            "engines": [row for rec in records for row in engine_rows(rec)],
            "published": None if records else published(layout.model, layout.root)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.summary", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="the recipes of the run, in table order")
    add_model(ap)
    add_setup_args(ap)  # the run's own flags: they decide which results are this run's
    args = ap.parse_args(argv)
    setup = setup_from_args(args)
    check_names(recipes := [load(p, args.model) for p in args.recipes], args.recipes)
    ran = [setup.adapt(r) for r in recipes]
    layout = setup.layout(recipes[0].model)
    s = summarize(layout, [r.name for r in ran], setup.eval_dir, setup.eval_limit, is_random_weights(ran[0].onnx_path),
                  ran_results(ran, setup))
    layout.write_json(layout.summary("json"), s)
    layout.write_text(layout.summary("csv"), to_csv(s["engines"]))
    layout.write_text(layout.summary("md"), markdown(s))
    print(markdown(s))


if __name__ == "__main__":
    run_main(main)
