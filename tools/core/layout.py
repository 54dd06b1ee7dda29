"""Where every file of a run lives, and the guard that keeps a run from replacing a committed result.

Build products (calibration tensors and caches, quantized models, engines, logs) live in the checkout under
calib/, models/<model>/, engines/ and logs/, named by a key that hashes the content they were made from. Results
(point records, ONNX Runtime scores, tables, reports) go under a results root: `runs/` unless the user names another
(`RESULTS=results` is the committed one), and a file git tracks is never overwritten without `overwrite`.
"""
from __future__ import annotations

import functools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tools.core.errors import UserError
from tools.core.files import REPO, digest, file_digest, write_json, write_text

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

    def calib_tensor(self, imgsz: int, images: int, seed: int, images_key: str) -> Path:
        """A calibration tensor (.npy): `images` images drawn with `seed`, named by their content (`images_key`), so
        two folders never collide."""
        return self.calib / f"{imgsz}-n{images}-s{seed}-{images_key}.npy"

    def quantized_onnx(self, recipe: str, key: str) -> Path:
        """A recipe's Q/DQ model, named by `key` (its quantize settings, the calibration images and the model bytes)."""
        return self.quant / f"{recipe}.{key}.onnx"

    @property
    def deploy(self) -> Path:
        return self.root / "models" / self.model / "deploy"

    def deploy_onnx(self, source, key: str) -> Path:
        """The end-to-end graph (tools/deploy_graph.py) of the ONNX `source`, named by `key` (source bytes and deploy
        settings)."""
        return self.deploy / f"{Path(source).stem}.e2e-{key}.onnx"

    def predict(self, recipe: str) -> Path:
        """Where `make predict` writes one recipe's annotated images or video and their detections."""
        return self.out / "predict" / recipe

    def rewritten_onnx(self, source, rewrites) -> Path:
        """`source` with the recipe's `graph_rewrites` applied (tools/yolo/graph_rewrites.py), one per source bytes and
        rewrites, beside the quantized models; `source` itself where there are none."""
        if not rewrites:
            return Path(source)
        key = digest({"source": file_digest(source), "graph_rewrites": list(rewrites)})
        return self.quant / f"{Path(source).stem}.rw-{key}.onnx"

    def autocast_onnx(self, source, imgsz: int) -> Path:
        """ModelOpt AutoCast's FP16 model of `source` (TensorRT 11), by its bytes and, off 640, the image size it was
        judged at."""
        size = f"-{imgsz}" if imgsz != 640 else ""
        return self.quant / f"{self.model}.autocast-fp16{size}.{file_digest(source)[:12]}.onnx"

    @property
    def engines(self) -> Path:
        return self.root / "engines" / self.model

    def engine(self, stem: str) -> Path:
        return self.engines / f"{stem}.engine"

    def timing_cache(self, key: str) -> Path:
        """TensorRT's timing cache of one (TensorRT, GPU, precision flags, level): it refuses one of another."""
        return self.engines / f"timing-{key}.cache"

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

    def point_record(self, name: str, profile: str, key: str) -> Path:
        """The record of one engine (recipe, deployment profile) on one evaluation set: `key` hashes all of it."""
        return self.points / f"{name}.{profile}.{key}.json"

    def records_keyed(self, key: str) -> list[Path]:
        """The point records of this key (a sweep table names its rows' records by key)."""
        return sorted(self.points.glob(f"*.{key}.json"))

    @property
    def onnxrt(self) -> Path:
        return self.out / "onnxrt"

    def onnxrt_result(self, kind: str, key: str) -> Path:
        """An ONNX Runtime score of `kind` (fp32, or the recipe whose Q/DQ model it is), `key` its inputs' hash."""
        return self.onnxrt / f"{kind}.{key}.json"

    @property
    def sweep_json(self) -> Path:
        """The sweep table (tools.sweep writes it, tools.report and tools.sizes read it); sweep.csv beside it."""
        return self.out / "sweep.json"

    @property
    def sweep_csv(self) -> Path:
        return self.out / "sweep.csv"

    def summary(self, ext: str) -> Path:
        """summary.json / .csv / .md of `make all` (tools.summary)."""
        return self.out / f"summary.{ext}"

    def e2e(self, ext: str) -> Path:
        """e2e.json / .csv / .md of `make e2e` (tools.e2e)."""
        return self.out / f"e2e.{ext}"

    def written(self) -> dict[Path, tuple[str, ...]]:
        """What the tools write for this model, as globs by folder (`make clean` removes these and nothing else):
        every artifact named above, and the report's and sensitivity's own files (tools.report, tools.sensitivity)."""
        return {self.calib: ("*.npy", "*.json", "*.npz", "*.cache", "*.full.onnx"), self.quant: ("*.onnx", "*.json"),
                self.deploy: ("*.onnx", "*.json"), self.engines: ("*.engine", "*.cache"),
                self.logs: ("**/*.log", "**/*.json", "**/*.csv"),
                self.out: ("points/*.json", "onnxrt/*.json", "sweep/recipes/*.yaml", "summary.json", "summary.csv",
                           "summary.md", "sweep.json", "sweep.csv", "e2e.json", "e2e.csv", "e2e.md", "REPORT.md",
                           "selection.json", "chosen.yaml", "pareto_*.png", "sensitivity*.json", "sensitivity*.md",
                           "profile/*/*.csv", "profile/*/profile.md", "profile/*/profile.png", "predict/**/*",
                           "logs/**/*")}

    def layer_tables(self, profile: str, level: int) -> Path:
        """`make profile`'s per-layer tables of one deployment profile and builder level (folder names as published)."""
        return self.out / "profile" / f"{profile}-L{level}"

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
