"""Artifact layout and records: where every file of a run lives, what each result is keyed by, which record wins.

Build products (calibration tensors and caches, quantized models, engines, logs) live in the checkout under
calib/, models/<model>/, engines/ and logs/, named by a key that hashes the content they were made from. Results
(point records, ONNX Runtime scores, tables, reports) go under a results root: `runs/` unless the user names another
(`RESULTS=results` is the committed one), and a file git tracks is never overwritten without `overwrite`.
Keys hash content, never paths: the model's bytes, every image and annotation file, the recipe fields that shape the
stage (tools.recipe), the TensorRT version and the GPU, so no changed input can return an old number.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.common import REPO, UserError, list_images, sha256_file, write_json, write_text
from tools.recipe import digest


# ----------------------------------------------------------------------------------------------------------------
# Content digests
@functools.lru_cache(maxsize=None)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_digest(path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in a process."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


def images_digest(files) -> str:
    """One digest for a list of images: their names and bytes, in order."""
    return digest([[Path(p).name, file_digest(p)] for p in files])


def eval_set(eval_dir, limit: int | None = None) -> dict:
    """What an accuracy number depends on besides the model: the images scored, the annotations and the list of
    exact-annotation ids; `key` hashes all of it."""
    eval_dir = Path(eval_dir)
    files = list_images(eval_dir)
    files = files[:limit] if limit else files
    annotations = eval_dir / "annotations.json"
    if not annotations.is_file():
        raise UserError(f"{annotations}: no COCO annotations; EVAL_DIR must hold images/ and annotations.json")
    exact = eval_dir / "exact_ids.txt"
    parts = {"images": images_digest(files), "count": len(files),
             "annotations": file_digest(annotations), "exact_ids": file_digest(exact) if exact.is_file() else None}
    return {**parts, "key": digest(parts)}


# ----------------------------------------------------------------------------------------------------------------
# Layout
RUNS = REPO / "runs"  # where a run's results go unless the user names another place


@dataclass(frozen=True)
class Layout:
    """Paths of one model's artifacts. `root` holds the build products, `results` the records and tables."""
    model: str
    root: Path = REPO
    results: Path = RUNS
    overwrite: bool = False  # replace files that git tracks (the committed results)

    @property
    def calib(self) -> Path:
        return self.root / "calib" / self.model

    @property
    def quant(self) -> Path:
        return self.root / "models" / self.model / "quant"

    def deploy_onnx(self, source, key: str) -> Path:
        """The end-to-end graph (tools/deploy_graph.py) of the ONNX `source`, named by `key` (source bytes and deploy
        settings)."""
        return self.root / "models" / self.model / "deploy" / f"{Path(source).stem}.e2e-{key}.onnx"

    def predict(self, recipe: str) -> Path:
        """Where `make predict` writes one recipe's annotated images or video and their detections."""
        return self.out / "predict" / recipe

    @property
    def engines(self) -> Path:
        return self.root / "engines" / self.model

    def ultralytics_engine(self, engine) -> Path:
        """The copy of `engine` with ultralytics' metadata header (tools.ultralytics_engine): a deploy artifact beside
        the engine trtexec wrote, which stays the one keys and timings refer to."""
        return self.engines / f"{Path(engine).name.removesuffix('.engine')}.ultralytics.engine"

    @property
    def logs(self) -> Path:
        return self.root / "logs" / self.model

    @property
    def out(self) -> Path:
        return self.results / self.model

    @property
    def points(self) -> Path:
        return self.out / "points"

    @property
    def onnxrt(self) -> Path:
        return self.out / "onnxrt"

    def rel(self, path) -> str:
        """A path as records store it: relative to the checkout where it lies inside it."""
        path = Path(path)
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def resolve(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    # --- writing results ---------------------------------------------------------------------------------------
    def guard(self, path) -> Path:
        return guard(path, self.overwrite)

    def write_json(self, path, obj) -> None:
        write_json(self.guard(path), obj)

    def write_text(self, path, text: str) -> None:
        write_text(self.guard(path), text)


def guard(path, overwrite: bool) -> Path:
    """Refuse to replace a committed file unless asked: results are regenerated on purpose, never by accident."""
    path = Path(path)
    if not overwrite and path.exists() and is_tracked(path):
        raise UserError(f"{path}: is a committed result; write elsewhere (RESULTS=dir, --results DIR) or pass "
                        f"OVERWRITE=1 (--overwrite) to replace it")
    return path


@functools.lru_cache(maxsize=None)
def _tracked(top: str) -> frozenset:
    try:
        out = subprocess.run(["git", "-C", top, "ls-files", "-z"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    return frozenset(os.path.join(top, p) for p in out.stdout.decode().split("\0") if p) if out.returncode == 0 \
        else frozenset()


def is_tracked(path) -> bool:
    """Whether git tracks `path` in the checkout that holds it (False outside a git checkout)."""
    path = Path(path).resolve()
    top = next((p for p in (path, *path.parents) if (p / ".git").exists()), None)
    return top is not None and str(path) in _tracked(str(top))


# ----------------------------------------------------------------------------------------------------------------
# Records
def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def updated(record: dict) -> str:
    """When a record last changed: `updated_utc`, else (records of earlier versions) its latest stage time."""
    return record.get("updated_utc") or max(record.get("measured_utc", {}).values(), default="")


def newest(records) -> dict | None:
    """The one rule for "the newest record": latest update time, then key (a stable tie-break)."""
    return max(records, key=lambda r: (updated(r), r.get("key", "")), default=None)


def newest_per(records, key) -> dict:
    """{key(record): the newest record with that key}: one record per engine, per kind, ..."""
    groups = {}
    for rec in records:
        groups.setdefault(key(rec), []).append(rec)
    return {k: newest(g) for k, g in groups.items()}


def engine_id(record: dict) -> tuple:
    """What makes an engine record a row of its own in a table: the recipe, its profile and its builder level."""
    return record["name"], record["profile"]["name"], record["level"]


def read_json(path, what: str = "record") -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable {what} ({type(e).__name__}); delete it and rerun the stage") from None


def read_records(folder, glob: str = "*.json") -> list[dict]:
    folder = Path(folder)
    return [read_json(p) for p in sorted(folder.glob(glob))] if folder.is_dir() else []


@dataclass
class Record:
    """A record on disk: a JSON object at `path`, saved atomically with its update time."""
    path: Path
    data: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path, fresh) -> "Record":
        """The record at `path`, or `fresh()` (a new record's fields, made only when there is none yet)."""
        path = Path(path)
        return cls(path, read_json(path) if path.is_file() else fresh())

    def save(self, layout: Layout) -> None:
        self.data["updated_utc"] = now_utc()
        layout.write_json(self.path, self.data)


# ----------------------------------------------------------------------------------------------------------------
# Publishing a run
LOG_KEYS = ("log", "layers_json", "profile_json", "csv")  # keys whose values are files a record points to


def publish(run_root: Path, run_results: Path, dest: Layout) -> list[Path]:
    """Copy a run's records and tables (from a GPU machine, say) into `dest`: the records, sweep table and per-layer
    profiles, and every log a record points to, into <dest>/<model>/logs/, with the records' paths rewritten to
    the copies (logs/ is not committed, a results folder is). Returns the files written."""
    import shutil

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
    for name in ("sweep.json", "sweep.csv"):
        if (src / name).is_file():
            dest.write_text(dest.out / name, (src / name).read_text())
            written.append(dest.out / name)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Cleaning: what the tools write for a model, by folder (globs); anything else there is the user's and stays
WRITTEN = {"calib": ("*.npy", "*.json", "*.npz", "*.cache", "*.full.onnx"), "quant": ("*.onnx", "*.json"),
           "engines": ("*.engine", "*.cache"), "logs": ("**/*.log", "**/*.json", "**/*.csv"),
           "out": ("points/*.json", "onnxrt/*.json", "sweep/recipes/*.yaml", "summary.json", "summary.csv",
                   "summary.md", "sweep.json", "sweep.csv", "REPORT.md", "selection.json", "chosen.yaml",
                   "pareto_*.png", "sensitivity*.json", "sensitivity*.md", "profile/*/*.csv", "profile/*/profile.md",
                   "profile/*/profile.png", "logs/**/*")}
LEFT_BEHIND = "**/.*.tmp*"  # atomic_path's temporary files, where a killed process could not remove its own


def clean(layout: Layout) -> list[Path]:
    """Remove what runs wrote for `layout.model` (build products under `root`, results under `results`), never a
    file git tracks nor one the tools do not write; then the folders that this left empty. Returns the files."""
    removed = []
    for folder, globs in WRITTEN.items():
        top = getattr(layout, folder)
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
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tools.records", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    pub = sub.add_parser("publish", help="copy a run's records, tables and logs into a results folder")
    pub.add_argument("run_root", help="the checkout the run ran in (its logs/ lie there)")
    pub.add_argument("--results", default="runs", help="the run's results folder, relative to run_root")
    pub.add_argument("--model", default="yolo11n")
    pub.add_argument("--to", default=str(REPO / "results"), help="results root to publish into (default: results/)")
    pub.add_argument("--overwrite", action="store_true", help="replace committed files")
    cln = sub.add_parser("clean", help="remove what runs wrote for a model (build products and its results folder)")
    cln.add_argument("--model", default="yolo11n")
    cln.add_argument("--results", default=str(RUNS), help="results root of the run (default: runs/)")
    args = ap.parse_args(argv)
    if args.verb == "clean":
        layout = Layout(args.model, REPO, Path(args.results).resolve())
        print(f"removed {len(clean(layout))} files that runs wrote for {args.model} (kept every other file)")
        return
    root = Path(args.run_root).resolve()
    written = publish(root, root / args.results, Layout(args.model, REPO, Path(args.to).resolve(), args.overwrite))
    print(f"published {len(written)} files into {Path(args.to) / args.model}")


if __name__ == "__main__":
    from tools.common import run_main

    run_main(main)
