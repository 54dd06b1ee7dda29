"""The results table of `make all`: results/<model>/summary.{json,csv,md} from the finished point records.

summary.json is a contract other tools read: keys gpu, tensorrt, eval_images, calib_images, onnx_fp32_map50_95
and engines (one object per engine and batch: name, batch, latency_ms_p50, latency_ms_p99, throughput_ips,
map50_95, map50, engine_mb, build_s; CUDA-graph timings and the exact-annotation subset ride along).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.common import REPO, UserError, run_main, write_json, write_text
from tools.pipeline import has_all_stages
from tools.trtlog import to_csv

MAIN_ENGINES = ("fp16", "int8-qdq", "int8-implicit", "int8-ultralytics")


def load_records(model: str, root: Path = REPO, names=None) -> list[dict]:
    """Finished records (engine, bench and accuracy present), the newest per name."""
    newest = {}
    for path in sorted((root / "results" / model / "points").glob("*.json"), key=lambda p: p.stat().st_mtime):
        rec = json.loads(path.read_text())
        if has_all_stages(rec) and (names is None or rec["name"] in names):
            newest[rec["name"]] = rec
    return list(newest.values())


def onnxrt_results(model: str, images: int, root: Path = REPO) -> dict[str, dict]:
    """ONNX Runtime results on an evaluation set of `images` images, the newest per kind."""
    out = {}
    for path in sorted((root / "results" / model / "onnxrt").glob("*.json"), key=lambda p: p.stat().st_mtime):
        res = json.loads(path.read_text())
        if res["images"] == images:
            out[res["kind"]] = res
    return out


def bench_row(rec: dict, batch: int, graph: bool) -> dict | None:
    return next((b for b in rec["bench"] if b["batch"] == batch and b["cuda_graph"] == graph), None)


def engine_rows(rec: dict) -> list[dict]:
    rows = []
    for batch in sorted({b["batch"] for b in rec["bench"]}):
        plain, graph = bench_row(rec, batch, False), bench_row(rec, batch, True)
        base = plain or graph  # a sweep may time CUDA graphs only: `cuda_graph` says which run these columns are
        row = {"name": rec["name"], "batch": batch, "gpu": rec["gpu"], "tensorrt": rec["trt_version"],
               "cuda_graph": plain is None, "latency_ms_p50": base["latency_ms_p50"],
               "latency_ms_p99": base["latency_ms_p99"], "throughput_ips": base["throughput_ips"],
               "map50_95": rec["accuracy"]["map50_95"], "map50": rec["accuracy"]["map50"],
               "engine_mb": rec["build"]["engine_mb"], "build_s": rec["build"]["build_s"]}
        if plain and graph:
            row.update(latency_ms_p50_cuda_graph=graph["latency_ms_p50"], latency_ms_p99_cuda_graph=graph["latency_ms_p99"],
                       throughput_ips_cuda_graph=graph["throughput_ips"])
        if "exact" in rec["accuracy"]:
            row.update(exact_map50_95=rec["accuracy"]["exact"]["map50_95"], exact_map50=rec["accuracy"]["exact"]["map50"])
        row.update(gpu_mem_mib=base.get("gpu_mem_mib"), polygraphy_passed=rec.get("compare", {}).get("passed"),
                   polygraphy_min_atol=rec.get("compare", {}).get("min_required_atol"))
        rows.append(row)
    return rows


def markdown(summary: dict) -> str:
    head = (f"YOLO11n on {summary['gpu']}, TensorRT {summary['tensorrt']}; mAP on {summary['eval_images']} COCO "
            f"val2017 images ({summary.get('exact_images', 0)} with exact annotations in brackets); "
            f"calibration on {summary['calib_images']} other images. ONNX Runtime FP32 mAP50-95 "
            f"{summary['onnx_fp32_map50_95']:.4f}. Latency is trtexec's GPU compute median/p99 without "
            f"transfers; CUDA-graph columns replay the same engine as a CUDA graph (a sweep times only those, so its "
            f"records leave the plain columns empty).\n\n")
    cols = ["engine", "batch", "p50 ms", "p99 ms", "img/s", "p50 ms (graph)", "p99 ms (graph)", "img/s (graph)",
            "mAP50-95", "mAP50", "engine MB", "build s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in summary["engines"]:
        exact = f" ({r['exact_map50_95']:.4f})" if r.get("exact_map50_95") is not None else ""
        plain = {k: None if r.get("cuda_graph") else r[k] for k in ("latency_ms_p50", "latency_ms_p99", "throughput_ips")}
        graph = {k: r.get(f"{k}_cuda_graph", r[k] if r.get("cuda_graph") else None)
                 for k in ("latency_ms_p50", "latency_ms_p99", "throughput_ips")}
        lines.append(f"| {r['name']} | {r['batch']} | {fmt(plain['latency_ms_p50'], '.3f')} | "
                     f"{fmt(plain['latency_ms_p99'], '.3f')} | {fmt(plain['throughput_ips'], ',.0f')} | "
                     f"{fmt(graph['latency_ms_p50'], '.3f')} | {fmt(graph['latency_ms_p99'], '.3f')} | "
                     f"{fmt(graph['throughput_ips'], ',.0f')} | "
                     f"{r['map50_95']:.4f}{exact} | {r['map50']:.4f} | {r['engine_mb']:.1f} | {fmt(r['build_s'], '.0f')} |")
    return head + "\n".join(lines) + "\n"


def summarize(model: str, calib_images: int | None = None, root: Path = REPO) -> dict:
    records = load_records(model, root, MAIN_ENGINES)
    if not records:
        raise UserError(f"results/{model}/points: no finished engine records; run `make all` (or `make gpu`) first")
    records.sort(key=lambda r: MAIN_ENGINES.index(r["name"]))
    first = records[0]
    onnxrt = onnxrt_results(model, first["accuracy"]["images"], root)
    fp32 = onnxrt.get("fp32")
    return {"model": model, "gpu": first["gpu"], "tensorrt": first["trt_version"],
            "eval_images": first["accuracy"]["images"], "exact_images": first["accuracy"].get("exact", {}).get("images", 0),
            "calib_images": calib_images if calib_images is not None else
            max((r["recipe"]["calib_images"] for r in records if r["precision"] != "fp16"), default=0),
            "onnx_fp32_map50_95": fp32["map50_95"] if fp32 else None,
            "onnx_fp32_map50": fp32["map50"] if fp32 else None,
            "onnxrt": {k: {m: v[m] for m in ("map50_95", "map50", "images")} | {"exact_map50_95": v.get("exact", {}).get("map50_95")}
                       for k, v in onnxrt.items()},
            "engines": [row for rec in records for row in engine_rows(rec)]}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.summary", description=__doc__)
    ap.add_argument("--model", default="yolo11n")
    ap.add_argument("--eval-dir", help="(recorded for the reader)")
    ap.add_argument("--calib-dir", help="(recorded for the reader)")
    ap.add_argument("--eval-limit", type=int)
    args = ap.parse_args(argv)
    s = summarize(args.model)
    if s["onnx_fp32_map50_95"] is None:
        s["onnx_fp32_map50_95"] = float("nan")
    out = REPO / "results" / args.model
    write_json(out / "summary.json", s)
    write_text(out / "summary.csv", to_csv(s["engines"]))
    write_text(out / "summary.md", markdown(s))
    print(markdown(s))


if __name__ == "__main__":
    run_main(main)
