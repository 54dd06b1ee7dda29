"""Publish a run's records into a results folder, and clean what runs wrote for a model.

`publish` copies a run's records and tables (from a GPU machine, say) and every log they point to; `clean` removes
the files the tools write for a model (build products and its results folder), never a file git tracks nor one the
tools do not write. Where each file lives: tools/core/layout.py; what a record holds: tools/core/record.py.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tools.core.cli import add_overwrite, add_results
from tools.core.errors import UserError, run_main
from tools.core.files import REPO
from tools.core.layout import Layout, is_tracked
from tools.core.record import LOG_KEYS, read_json


# ----------------------------------------------------------------------------------------------------------------
# Publishing a run
def publish(run_root: Path, run_results: Path, dest: Layout) -> list[Path]:
    """Copy a run's records and tables (from a GPU machine, say) into `dest`: the records, sweep table and per-layer
    profiles, and every log a record points to, into <dest>/<model>/logs/, with the records' paths rewritten to
    the copies (logs/ is not committed, a results folder is). Returns the files written."""
    src = run_results / dest.model
    if not src.is_dir():
        raise UserError(f"{src}: no results of model {dest.model} there; pass the run's results folder")
    logs, written = dest.out / "logs", []

    def moved(stored: str) -> str:
        path = Path(stored) if Path(stored).is_absolute() else run_root / stored
        if not path.is_file():
            return stored
        target = dest.guard(logs / path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return dest.rel(target)

    def rewrite(obj):
        if isinstance(obj, dict):
            return {k: moved(v) if k in LOG_KEYS and isinstance(v, str) else rewrite(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [rewrite(v) for v in obj]
        return obj

    for path in sorted((src / "points").glob("*.json")):
        rec = rewrite(read_json(path))
        dest.write_json(dest.points / path.name, rec)
        written.append(dest.points / path.name)
    source = Layout(dest.model, run_root, run_results)
    for src_table, table in ((source.sweep_json, dest.sweep_json), (source.sweep_csv, dest.sweep_csv)):
        if src_table.is_file():
            dest.write_text(table, src_table.read_text())
            written.append(table)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Cleaning: what the tools write for a model (Layout.written, by folder); anything else there is the user's and stays
LEFT_BEHIND = "**/.*.tmp*"  # atomic_path's temporary files, where a killed process could not remove its own


def clean(layout: Layout) -> list[Path]:
    """Remove what runs wrote for `layout.model` (build products under `root`, results under `results`), never a
    file git tracks nor one the tools do not write; then the folders that this left empty. Returns the files."""
    removed = []
    for top, globs in layout.written().items():
        if not top.is_dir():
            continue
        for path in sorted({p for g in (*globs, LEFT_BEHIND) for p in top.glob(g)}):
            if path.is_file() and not is_tracked(path):
                path.unlink()
                removed.append(path)
        for sub in sorted((p for p in top.glob("**") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(sub.iterdir()):
                sub.rmdir()
    for parent in {layout.quant.parent, layout.out}:  # models/<model>/ and <results>/<model>/ themselves
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return removed


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.records", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    pub = sub.add_parser("publish", help="copy a run's records, tables and logs into a results folder")
    pub.add_argument("run_root", help="the checkout the run ran in (its logs/ lie there)")
    pub.add_argument("--results", default="runs", help="the run's results folder, relative to run_root")
    pub.add_argument("--model", default="yolo11n")
    pub.add_argument("--to", default=str(REPO / "results"), help="results root to publish into (default: results/)")
    add_overwrite(pub)
    cln = sub.add_parser("clean", help="remove what runs wrote for a model (build products and its results folder)")
    cln.add_argument("--model", default="yolo11n")
    add_results(cln, overwrite=False)
    args = ap.parse_args(argv)
    if args.verb == "clean":
        layout = Layout(args.model, REPO, Path(args.results).resolve())
        print(f"removed {len(clean(layout))} files that runs wrote for {args.model} (kept every other file)")
        return
    root = Path(args.run_root).resolve()
    written = publish(root, root / args.results, Layout(args.model, REPO, Path(args.to).resolve(), args.overwrite))
    print(f"published {len(written)} files into {Path(args.to) / args.model}")


if __name__ == "__main__":
    run_main(main)
