"""Time an engine with trtexec (or the fallback) at each batch size, with and without CUDA graphs; and layer by
layer (the pipeline's `layers` stage, `make profile`).

One trtexec run per (batch, CUDA graph) with --noDataTransfers, so latency is GPU compute time; each log is parsed
by tools.trtlog. Throughput in images/s is trtexec's qps times the batch.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from tools.core.cli import add_imgsz, add_timing, add_trtexec, default_trtexec
from tools.core.errors import UserError, run_main
from tools.core.files import to_csv, write_text
from tools.core.record import BenchRow, Layers
from tools.engine import run_logged, shape
from tools.trtlog import parse_file
from tools.yolo.layers import KINDS, load, precisions_of, rounded, timed_runs, totals


def bench_args(engine, batch: int, imgsz: int, cuda_graph: bool, warmup_ms: int, duration_s: float,
               layout: str = "nchw") -> list[str]:
    args = [f"--loadEngine={engine}", f"--shapes={shape(batch, imgsz, layout)}", "--noDataTransfers",
            f"--warmUp={warmup_ms}", f"--duration={duration_s:g}", "--percentile=90,95,99"]
    return args + (["--useCudaGraph"] if cuda_graph else [])


def context_mib(log_text: str) -> float | None:
    """GPU memory TensorRT allocated for the execution context, as trtexec logs it."""
    m = re.search(r"IExecutionContext creation: CPU \+\d+, GPU \+(\d+)", log_text)
    return float(m.group(1)) if m else None


def bench(engine, trtexec: list[str], log_prefix, batches=(1, 8, 32), imgsz=640, cuda_graphs=(False, True),
          warmup_ms=500, duration_s=3.0, layout: str = "nchw") -> list[BenchRow]:
    """`layout`: the engine's input layout (nhwc for an end-to-end engine built so, tools.engine.input_layout)."""
    rows = []
    for batch in batches:
        for graph in cuda_graphs:
            log = Path(f"{log_prefix}.bench-b{batch}{'-graph' if graph else ''}.log")
            rc, _ = run_logged(trtexec + bench_args(engine, batch, imgsz, graph, warmup_ms, duration_s, layout), log)
            parsed = parse_file(log)
            if rc != 0 or "gpu_median_ms" not in parsed:
                raise UserError(f"{log}: timing {engine} at batch {batch} failed (exit {rc}); read the log")
            mib = parsed.get("gpu_mem_mib") or context_mib(log.read_text())
            rows.append({"batch": batch, "cuda_graph": graph,
                         "latency_ms_p50": parsed["gpu_median_ms"], "latency_ms_p90": parsed.get("gpu_p90_ms"),
                         "latency_ms_p99": parsed.get("gpu_p99_ms"), "latency_ms_mean": parsed["gpu_mean_ms"],
                         "throughput_qps": parsed["throughput_qps"],
                         "throughput_ips": round(parsed["throughput_qps"] * batch, 1),
                         "gpu_mem_mib": mib, "activation_mib": (parsed["activation_bytes"] / 2**20
                                                                 if "activation_bytes" in parsed else None),
                         "fallback": parsed["fallback"], "log": str(log)})
    return rows


def layers_args(engine, batch: int, imgsz: int, layers_json, profile_json, layout: str = "nchw") -> list[str]:
    """trtexec flags: unprofiled timing runs (their median is the end-to-end time), then a profiled run of its own."""
    return [f"--loadEngine={engine}", f"--shapes={shape(batch, imgsz, layout)}", "--noDataTransfers", "--separateProfileRun",
            "--dumpProfile", f"--exportProfile={profile_json}", f"--exportLayerInfo={layers_json}"]


def time_layers(engine, trtexec: list[str], log_prefix, batch: int, imgsz: int, layout: str = "nchw") -> Layers:
    """Time `engine` (built with --profilingVerbosity=detailed) layer by layer at one batch size: writes
    <log_prefix>.profile-b<batch>.{log,layers.json,profile.json,layers.csv}; returns a small record for the
    engine's results (paths, sum of layer medians and end-to-end median, ms by kind and precision, reformats)."""
    prefix = f"{log_prefix}.profile-b{batch}"
    log, layers_json, profile_json, csv_path = (Path(prefix + s) for s in (".log", ".layers.json", ".profile.json",
                                                                           ".layers.csv"))
    for p in (layers_json, profile_json):
        p.unlink(missing_ok=True)  # a failed run must not leave an earlier engine's export to be read as this one's
    rc, _ = run_logged(trtexec + layers_args(engine, batch, imgsz, layers_json, profile_json, layout), log)
    if rc != 0 or not (layers_json.is_file() and profile_json.is_file()):
        raise UserError(f"{log}: timing the layers of {engine} at batch {batch} failed (exit {rc}); read the log")
    rows = load(layers_json, profile_json)
    write_text(csv_path, to_csv(rounded(rows)))
    t = totals(rows)
    return Layers(batch=batch, log=str(log), layers_json=str(layers_json), profile_json=str(profile_json),
                  csv=str(csv_path), profiled_runs=timed_runs(profile_json), layers_run=t["layers_run"],
                  layers_ms=round(t["ms"], 4), e2e_ms=parse_file(log).get("gpu_median_ms"),
                  ms_by_kind={k: round(t[f"{k}_ms"], 4) for k in KINDS[:-1] if t[f"{k}_ms"]},
                  ms_by_precision={p: round(t[f"{p}_ms"], 4) for p in precisions_of(rows) if t[f"{p}_ms"]},
                  reformat_n=t["reformat_n"], reformat_ms=round(t["reformat_ms"], 4))




def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__)
    ap.add_argument("engine")
    ap.add_argument("--batches", default="1,8,32")
    add_imgsz(ap)
    ap.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw", help="the engine's input layout")
    add_trtexec(ap)
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph runs")
    add_timing(ap)
    ap.add_argument("--log-prefix", help="default: logs/<engine stem>")
    ap.add_argument("-o", "--output", help="CSV to write")
    args = ap.parse_args(argv)
    prefix = args.log_prefix or f"logs/{Path(args.engine).stem}"
    trtexec = shlex.split(args.trtexec) if args.trtexec else list(default_trtexec())
    rows = bench(args.engine, trtexec, prefix, [int(b) for b in args.batches.split(",")],
                 args.imgsz, (False,) if args.no_graphs else (False, True), args.warmup_ms, args.duration, args.layout)
    text = to_csv(rows)
    write_text(args.output, text) if args.output else print(text, end="")


if __name__ == "__main__":
    run_main(main)
