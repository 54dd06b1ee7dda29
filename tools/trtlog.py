"""Parse trtexec logs (NVIDIA's or our fallback's: the summary lines are the same) into rows and CSV.

Build logs give build time, engine size and activation memory; inference logs give throughput and the latency
statistics. Usage: python -m tools.trtlog logs/yolo11n/*.log -o results/yolo11n/trtexec.csv
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from tools.core.errors import UserError, run_main
from tools.core.files import to_csv, write_text

STAT = r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=?\s*([-\d.eE+]+) ms"
SECTIONS = {"Latency": "latency", "GPU Compute Time": "gpu", "Enqueue Time": "enqueue", "H2D Latency": "h2d",
            "D2H Latency": "d2h"}


def parse_stats(text: str) -> dict[str, float]:
    out = {}
    for name, pct, value in re.findall(STAT, text):
        out[f"p{pct.rstrip('0').rstrip('.') if '.' in pct else pct}" if pct else name] = float(value)
    return out


def parse(text: str) -> dict:
    """One log's text -> flat dict (keys absent when the log lacks them)."""
    row = {}
    if m := re.search(r"\[TensorRT v(\d+)\]", text):
        row["trt_version_code"] = int(m.group(1))
    if m := re.search(r"\[TensorRT v(\d+\.\d+[\d.]*)\]", text):
        row["trt_version"] = m.group(1)
    row["fallback"] = "trtexec_py" in text[:2000]
    if m := re.search(r"--avgTiming=(\d+)", text[:4000]):  # the command line heads the log
        row["avg_timing"] = int(m.group(1))
    if m := re.search(r"Engine built in ([\d.]+) sec", text):
        row["build_s"] = float(m.group(1))
    if m := re.search(r"Created engine with size: ([\d.]+) MiB", text):
        row["engine_mib"] = float(m.group(1))
    if m := re.search(r"Total Activation Memory: (\d+)", text):
        row["activation_bytes"] = int(m.group(1))
    if m := re.search(r"GPU memory used by engine, context and buffers: ([\d.]+) MiB", text):
        row["gpu_mem_mib"] = float(m.group(1))
    if m := re.search(r"Throughput: ([\d.eE+]+) qps", text):
        row["throughput_qps"] = float(m.group(1))
    for line in text.splitlines():
        for label, key in SECTIONS.items():
            if re.search(rf"\] {re.escape(label)}: min", line) or line.startswith(f"{label}: min"):
                for stat, value in parse_stats(line).items():
                    row[f"{key}_{stat}_ms"] = value
    if m := re.search(r"Total Host Walltime: ([\d.]+) s", text):
        row["walltime_s"] = float(m.group(1))
    row["passed"] = "&&&& PASSED" in text
    return row


def parse_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such log; run the build/bench step that writes it")
    return {"log": str(path), **parse(path.read_text(errors="replace"))}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.trtlog", description=__doc__)
    ap.add_argument("logs", nargs="+")
    ap.add_argument("-o", "--output", help="CSV to write (default: print)")
    args = ap.parse_args(argv)
    text = to_csv([parse_file(p) for p in args.logs])
    if args.output:
        write_text(args.output, text)
        print(f"wrote {args.output} ({len(args.logs)} logs)")
    else:
        print(text, end="")


if __name__ == "__main__":
    run_main(main)
