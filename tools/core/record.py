"""Point records: the JSON object one engine's stages fill in, which record is the newest, and how tables read them.

A record is keyed by what it depends on (the engine's settings, ONNX bytes, TensorRT, GPU, evaluation set); each GPU
stage writes its own part of it (`build`, `bench`, `accuracy`, `compare`, `layers`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from tools.core.errors import UserError
from tools.core.layout import Layout
from tools.core.recipe import from_dict
LOG_KEYS = ("log", "layers_json", "profile_json", "csv")  # keys whose values are files a record points to


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def updated(record: PointRecord) -> str:
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


def engine_id(record: PointRecord) -> tuple:
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


# ----------------------------------------------------------------------------------------------------------------
# The point record's schema: what each stage writes (tests/test_records.py checks the committed records against it)
class Build(TypedDict):
    """The engine stage's part: the engine and its build log (paths as Layout.rel stores them)."""
    engine: str
    log: str
    build_s: float | None
    engine_mb: float
    fallback: bool  # built by tools.trtexec_py rather than NVIDIA's trtexec
    timing_cache: bool
    reused: bool  # the engine was there already (an earlier run's build, its log that run's), so not built now


class BenchRow(TypedDict, total=False):
    """One (batch, CUDA graph) timing of the bench stage, under one timing protocol (warmup_ms, duration_s)."""
    batch: int
    cuda_graph: bool
    latency_ms_p50: float
    latency_ms_p90: float | None
    latency_ms_p99: float | None
    latency_ms_mean: float
    throughput_qps: float
    throughput_ips: float
    gpu_mem_mib: float | None
    activation_mib: float | None
    fallback: bool
    log: str
    warmup_ms: int
    duration_s: float
    gpu_index: str


class Accuracy(TypedDict, total=False):
    """The accuracy stage's COCO scores (tools.evaluate): all images, the exact-annotation subset, the two halves."""
    images: int
    map50_95: float
    map50: float
    exact: dict
    halves: dict


class Layers(TypedDict):
    """The layers stage's per-layer timing (tools.bench.time_layers; the tables are tools/yolo/layers.py's)."""
    batch: int
    log: str
    layers_json: str
    profile_json: str  # trtexec's --exportProfile file: its per-layer times
    csv: str
    profiled_runs: int | None
    layers_run: int
    layers_ms: float
    e2e_ms: float | None
    ms_by_kind: dict[str, float]
    ms_by_precision: dict[str, float]
    reformat_n: int
    reformat_ms: float


class ImplicitCalibration(TypedDict):
    algorithm: str
    images: int
    cache: str


class PointRecord(TypedDict, total=False):
    """One engine's record: what it is built from (written when the record is made), then each stage's part."""
    name: str
    key: str
    engine_key: str
    model: str
    random_weights: bool
    precision: str
    profile: dict  # the deployment profile: name, min, opt, max, bench, static
    level: int
    recipe: dict  # the recipe as run (tools.core.recipe.to_dict)
    trt_version: str
    gpu: str
    plan: dict  # tools.trt_plan's Plan: onnx_kind, flags, notes
    onnx: str
    onnx_sha256: str
    eval: dict  # the evaluation set (tools.core.files.eval_set) with its dir and limit
    quantization: dict | None  # the quantization record beside the Q/DQ model (tools.quantize)
    build: Build
    implicit_calibration: ImplicitCalibration
    bench: list[BenchRow]
    accuracy: Accuracy
    compare: dict  # tools.compare's Polygraphy verdict, or why it was skipped
    layers: Layers
    measured_utc: dict[str, str]  # stage -> when it last ran
    stage_seconds: dict[str, float]  # stage -> seconds it took, summed over runs
    updated_utc: str


IDENTITY = ("name", "key", "engine_key", "model", "random_weights", "precision", "profile", "level", "recipe",
            "trt_version", "gpu", "plan", "onnx", "onnx_sha256", "eval", "quantization")  # every record has these
PARTS = {"build": Build, "implicit_calibration": ImplicitCalibration, "bench": BenchRow, "accuracy": Accuracy,
         "layers": Layers}  # the stage parts whose fields are fixed (compare is Polygraphy's own)


@dataclass
class Record:
    """A record on disk: a JSON object at `path`, saved atomically with its update time."""
    path: Path
    data: PointRecord = field(default_factory=dict)

    @classmethod
    def open(cls, path, fresh) -> "Record":
        """The record at `path`, or `fresh()` (a new record's fields, made only when there is none yet)."""
        path = Path(path)
        return cls(path, read_json(path) if path.is_file() else fresh())

    def save(self, layout: Layout) -> None:
        self.data["updated_utc"] = now_utc()
        layout.write_json(self.path, self.data)


RESULT_KEYS = ("build", "bench", "accuracy")  # what a finished point record holds: the result tables need them


def has_all_stages(record: PointRecord | None) -> bool:
    """Whether a point's record holds the result of every stage the result tables are built from."""
    return bool(record) and all(k in record for k in RESULT_KEYS)


def bench_row(rec: PointRecord, batch: int, graph: bool) -> BenchRow | None:
    return next((b for b in rec["bench"] if b["batch"] == batch and b["cuda_graph"] == graph), None)


def engine_rows(rec: PointRecord) -> list[dict]:
    """One row per timed batch of an engine record; a sweep may time CUDA graphs only (`cuda_graph` says which run
    the main timing columns are)."""
    rows = []
    for batch in sorted({b["batch"] for b in rec["bench"]}):
        plain, graph = bench_row(rec, batch, False), bench_row(rec, batch, True)
        base = plain or graph
        acc = rec["accuracy"]
        row = {"name": rec["name"], "profile": rec["profile"]["name"], "level": rec["level"], "batch": batch,
               "gpu": rec["gpu"], "tensorrt": rec["trt_version"], "cuda_graph": plain is None,
               "latency_ms_p50": base["latency_ms_p50"], "latency_ms_p99": base["latency_ms_p99"],
               "throughput_ips": base["throughput_ips"], "map50_95": acc["map50_95"], "map50": acc["map50"],
               "engine_mb": rec["build"]["engine_mb"], "build_s": rec["build"]["build_s"]}
        if plain and graph:
            row.update(latency_ms_p50_cuda_graph=graph["latency_ms_p50"],
                       latency_ms_p99_cuda_graph=graph["latency_ms_p99"], throughput_ips_cuda_graph=graph["throughput_ips"])
        if "exact" in acc:
            row.update(exact_map50_95=acc["exact"]["map50_95"], exact_map50=acc["exact"]["map50"])
        for half, scores in acc.get("halves", {}).items():
            row[f"map50_95_{half}"] = scores["map50_95"]
        row.update(gpu_mem_mib=base.get("gpu_mem_mib"), polygraphy_passed=rec.get("compare", {}).get("passed"),
                   polygraphy_min_atol=rec.get("compare", {}).get("min_required_atol"))
        rows.append(row)
    return rows


def settings_of(rec: PointRecord) -> dict | None:
    """The settings (Recipe.settings) of the recipe a record was made from; None for one this schema cannot read."""
    try:
        return from_dict(rec.get("recipe")).settings()
    except UserError:
        return None


def engine_records(layout: Layout, names, eval_key: str | None, recipes: dict | None = None) -> list[dict]:
    """Finished engine records of these recipes (on this evaluation set, unless `eval_key` is None; made with
    exactly these settings where `recipes` maps names to their Recipe.settings()): the newest per (recipe, profile,
    level), in the order of `names`."""
    found = [rec for rec in read_records(layout.points) if has_all_stages(rec) and rec["name"] in names
             and (eval_key is None or rec.get("eval", {}).get("key") == eval_key)
             and (recipes is None or settings_of(rec) == recipes[rec["name"]])]
    order = {n: i for i, n in enumerate(names)}
    return sorted(newest_per(found, engine_id).values(),
                  key=lambda r: (order[r["name"]], r["level"], r["profile"]["min"]))
