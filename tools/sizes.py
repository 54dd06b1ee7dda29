"""INT8 over FP16 by model size: <results>/sizes.{md,csv}, one table from every model's sweep.

For each model with a sweep table under the results root: FP16 and an INT8 recipe (default `int8-qdq`, the grids'
base) at the sweep's final builder level, for every deployment profile and batch both were timed at. A model's two
engines were built at the same level and profile and timed in that model's one run, so each speed-up is a ratio
measured in one run; absolute times of different sizes come from different runs, and the table names each run's
GPU, TensorRT, level, date and tactic-timing average. Where `make profile` wrote a per-layer profile
(`profile/<profile>-L<level>/by-block.csv`), the convolutions' own speed-up is added: it is what grows with the
channel counts. Models exported from a YAML have random weights: speed does not depend on them, accuracy does, so
this table shows no mAP at all.
Usage: python -m tools.sizes [--results results] [--models yolo11n,yolo11s,yolo11m] [--int8 int8-qdq] [--overwrite]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.core.cli import add_results
from tools.core.errors import UserError, run_main
from tools.core.files import to_csv, write_text
from tools.core.layout import Layout, guard
from tools.core.record import PointRecord, read_json
from tools.core.sweep_table import Table, best
from tools.trtlog import parse_file
from tools.yolo.layers import read_by_block

COLUMNS = {"model": "model", "weights": "weights", "profile": "profile", "batch": "batch", "level": "level",
           "fp16_ms": "FP16 p50 ms", "int8_ms": "INT8 p50 ms", "speedup": "INT8 speed-up", "fp16_ips": "FP16 img/s",
           "int8_ips": "INT8 img/s", "conv_speedup": "INT8 conv speed-up (layer profile)", "gpu": "GPU",
           "tensorrt": "TensorRT", "avg_timing": "avgTiming", "measured": "measured"}


def record_of(layout: Layout, key: str) -> dict:
    found = layout.records_keyed(key)
    if not found:
        raise UserError(f"{layout.points}: no record with key {key} (named in sweep.json); rebuild the table with "
                        f"`make sweep SWEEP_ARGS=--table-only`")
    return read_json(found[0])


def avg_timing(layout: Layout, rec: PointRecord) -> int | None:
    """The tactic-timing average the engine was built with, from its build log's command line (None: not given)."""
    log = layout.resolve(rec["build"]["log"])
    return parse_file(log).get("avg_timing") if log.is_file() else None


def conv_speedup(layout: Layout, profile: str, level: int, int8: str) -> float | None:
    path = layout.layer_tables(profile, level) / "by-block.csv"
    if not path.is_file():
        return None
    value = read_by_block(path).get("all", {}).get(f"conv_speedup_{int8}")
    return float(value) if value else None


def model_rows(layout: Layout, int8: str) -> list[dict]:
    """FP16 against `int8` at the sweep's final level, per profile and batch both were timed at."""
    sweep = read_json(layout.sweep_json, "sweep table")
    table = Table(sweep["rows"], sweep.get("final_level"))
    rows = []
    for profile, batch in sorted({(r["profile"], r["batch"]) for r in table.rows}, key=lambda k: (k[1], k[0])):
        at = table.at(table.final, profile, batch)
        if "fp16" not in at or int8 not in at:
            continue
        f, q = at["fp16"], at[int8]
        recs = [record_of(layout, r["key"]) for r in (f, q)]
        timings = {avg_timing(layout, rec) for rec in recs}
        rows.append({"model": layout.model, "weights": "random (speed only)" if f.get("random_weights") else "trained",
                     "profile": profile, "batch": batch, "level": table.final,
                     "fp16_ms": best(f, "latency_ms_p50"), "int8_ms": best(q, "latency_ms_p50"),
                     "speedup": round(best(f, "latency_ms_p50") / best(q, "latency_ms_p50"), 3),
                     "fp16_ips": best(f, "throughput_ips"), "int8_ips": best(q, "throughput_ips"),
                     "conv_speedup": conv_speedup(layout, profile, table.final, int8),
                     "gpu": f["gpu"], "tensorrt": f["tensorrt"],
                     "avg_timing": timings.pop() if len(timings) == 1 else "/".join(map(str, sorted(timings, key=str))),
                     "measured": min((rec.get("measured_utc", {}).get("bench") or "-") for rec in recs)[:10]})
    return rows


def size_table(results: Path, models: list[str] | None, int8: str) -> tuple[list[dict], list[str]]:
    """(rows of every measured model, smallest model first; the models asked for that have no such rows)."""
    swept = sorted(p.parent.name for p in results.glob("*/sweep.json"))
    wanted = models or swept
    rows, missing = [], []
    for model in wanted:
        found = model_rows(Layout(model, results=results), int8) if model in swept else []
        rows += found
        if not found:
            missing.append(model)
    if not rows:
        raise UserError(f"{results}: no sweep with fp16 and {int8} at its final level for "
                        f"{', '.join(wanted) or 'any model'}; run `make sweep MODEL=...` (or point --results at the "
                        f"published results/)")
    # smallest model first: FP16 engine time at the largest batch orders the sizes without a name convention
    size = {m: max((r["batch"], r["fp16_ms"]) for r in rows if r["model"] == m) for m in {r["model"] for r in rows}}
    return sorted(rows, key=lambda r: (size[r["model"]][1], r["batch"], r["profile"])), missing


def markdown(rows: list[dict], missing: list[str], int8: str, heading: str = "# INT8 over FP16 by model size") -> str:
    def cell(key, v):
        if v is None:
            return "-"
        if key == "speedup" or key == "conv_speedup":
            return f"{v:.2f}x"
        if key.endswith("_ms"):
            return f"{v:.3f}"
        return f"{v:,.0f}" if key.endswith("_ips") else str(v)

    md = [heading, "",
          f"`fp16` against `{int8}` (INT8 Q/DQ mixed with FP16), each model's pair built at the same builder level and "
          f"deployment profile and timed in one run (GPU compute median, CUDA graph or not, whichever is faster). The "
          f"speed-up is that run's ratio; the conv speed-up is the convolutions' own, from the per-layer profile (sums "
          f"of per-layer medians). Random-weight models are exported from ultralytics' YAML: their speed is real, "
          f"their accuracy is not, and no mAP is shown.", "",
          "| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(k, r[k]) for k in COLUMNS) + " |" for r in rows]
    if any(r["avg_timing"] is None for r in rows):
        md += ["", "avgTiming `-`: the build log passes no `--avgTiming`. Those engines predate the flag, when the "
                   "fallback trtexec timed each tactic once (the builder API's default); trtexec and the fallback now "
                   "average 8 timings, and with one TensorRT can keep a slower tactic (README, 'Results', 'Batch 1 is fixed')."]
    if missing:
        md += ["", f"Not measured: {', '.join(missing)} (no sweep with `fp16` and `{int8}` at its final level under "
                   f"the results root; `make sweep MODEL=<model>` on a GPU machine, then `python -m tools.records "
                   f"publish`)."]
    return "\n".join(md) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.sizes", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_results(ap)
    ap.add_argument("--models", help="comma-separated models, in any order (default: every model swept there)")
    ap.add_argument("--int8", default="int8-qdq", help="the INT8 recipe set against fp16 (default: int8-qdq)")
    args = ap.parse_args(argv)
    results = Path(args.results).resolve()
    rows, missing = size_table(results, args.models.split(",") if args.models else None, args.int8)
    md_path, csv_path = (guard(results / f"sizes.{ext}", args.overwrite) for ext in ("md", "csv"))
    write_text(csv_path, to_csv([{k: r[k] for k in COLUMNS} for r in rows]))
    write_text(md_path, markdown(rows, missing, args.int8))
    print(f"wrote {md_path} ({len({r['model'] for r in rows})} models" + (f"; not measured: {', '.join(missing)}"
                                                                        if missing else "") + ")")


if __name__ == "__main__":
    run_main(main)
