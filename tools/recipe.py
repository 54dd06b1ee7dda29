"""Recipes: one YAML file per configuration, read into one schema (unknown keys and bad values are errors).

A recipe states its precision once; `trt_plan` (tools/trt_plan.py) maps it onto the TensorRT version at hand.
Its `key` hashes everything that changes the artifacts, so the pipeline and the sweep reuse finished work.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tools.common import REPO, UserError

PRECISIONS = ("fp16", "int8-qdq", "int8-implicit")
CALIBRATION_METHODS = ("entropy", "max", "mse", "percentile")
IMPLICIT_CALIBRATORS = ("minmax", "entropy")
DTYPES = ("fp32", "fp16")


@dataclass(frozen=True)
class LayerPrecision:
    """Keep TensorRT layers whose name matches `match` (regex, searched) and, if given, whose type is `layer_type`
    (an ONNX op type such as Sigmoid or Conv) in `precision`: becomes trtexec --layerPrecisions."""
    match: str
    precision: str
    op_type: str | None = None


@dataclass(frozen=True)
class Recipe:
    # --- identity -------------------------------------------------------------------------------------------
    name: str
    model: str = "yolo11n"  # models/yolo11/<model>.onnx unless `onnx` says otherwise
    description: str = ""
    onnx: str | None = None
    imgsz: int = 640
    # --- engine precision: fp16 | int8-qdq (ModelOpt Q/DQ + FP16) | int8-implicit (TensorRT calibrator) ----
    precision: str = "fp16"
    # --- ModelOpt ONNX PTQ (int8-qdq only) ------------------------------------------------------------------
    calibration_method: str = "entropy"
    calibration_percentile: float = 99.99  # percentile method only: amax clips the top (100 - p) % of |x|
    calib_images: int = 400
    calib_seed: int = 0
    nodes_to_exclude: tuple[str, ...] = ()
    op_types_to_exclude: tuple[str, ...] = ()
    high_precision_dtype: str = "fp32"  # what TensorRT 10 gets; 8.6 needs fp32, 11 needs fp16 (see trt_plan)
    calibration_eps: tuple[str, ...] = ("cpu",)
    # --- TensorRT implicit INT8 (int8-implicit only; TensorRT <= 10) ----------------------------------------
    implicit_calibrator: str = "minmax"
    # --- builder --------------------------------------------------------------------------------------------
    layer_precisions: tuple[LayerPrecision, ...] = ()
    builder_optimization_level: int = 3
    timing_cache: bool = True
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    # --- bench ----------------------------------------------------------------------------------------------
    bench_batches: tuple[int, ...] = (1, 8, 32)
    # free-form provenance notes (e.g. what was changed to build on TensorRT 8.6); not hashed
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        where = f"recipe {self.name!r}"
        checks = [
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.calibration_method in CALIBRATION_METHODS, f"calibration_method must be one of {CALIBRATION_METHODS}"),
            (self.implicit_calibrator in IMPLICIT_CALIBRATORS,
             f"implicit_calibrator must be one of {IMPLICIT_CALIBRATORS}"),
            (self.high_precision_dtype in DTYPES, f"high_precision_dtype must be one of {DTYPES}"),
            (0 <= self.builder_optimization_level <= 5, "builder_optimization_level must be 0..5"),
            (1 <= self.min_batch <= self.opt_batch <= self.max_batch, "need 1 <= min_batch <= opt_batch <= max_batch"),
            (all(self.min_batch <= b <= self.max_batch for b in self.bench_batches),
             "every bench_batches entry must lie in [min_batch, max_batch]"),
            (self.calib_images > 0, "calib_images must be positive"),
            (0 < self.calibration_percentile <= 100, "calibration_percentile must lie in (0, 100]"),
            (self.imgsz % 32 == 0, "imgsz must be a multiple of 32"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"{where}: {msg}")
        for lp in self.layer_precisions:
            if lp.precision not in DTYPES:
                raise UserError(f"{where}: layer_precisions precision must be one of {DTYPES}, not {lp.precision!r}")
            try:
                re.compile(lp.match)
            except re.error as e:
                raise UserError(f"{where}: layer_precisions match {lp.match!r} is not a regex ({e})") from None
        for pattern in self.nodes_to_exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"{where}: nodes_to_exclude {pattern!r} is not a regex ({e})") from None

    # ---------------------------------------------------------------------------------------------------------
    @property
    def onnx_path(self) -> Path:
        return REPO / (self.onnx or f"models/yolo11/{self.model}.onnx")

    @property
    def quantized(self) -> bool:
        return self.precision == "int8-qdq"

    @property
    def calibrated(self) -> bool:
        return self.precision in ("int8-qdq", "int8-implicit")

    def settings(self) -> dict:
        """Everything that shapes the artifacts, as plain JSON (identity and notes left out)."""
        d = dataclasses.asdict(self)
        for k in ("name", "description", "notes"):
            d.pop(k)
        if not self.quantized:
            for k in ("calibration_method", "nodes_to_exclude", "op_types_to_exclude", "high_precision_dtype",
                      "calibration_eps"):
                d.pop(k)
        if not (self.quantized and self.calibration_method == "percentile"):
            d.pop("calibration_percentile")
        if self.precision != "int8-implicit":
            d.pop("implicit_calibrator")
        if not self.calibrated:
            d.pop("calib_images"), d.pop("calib_seed")
        return d

    def quantize_settings(self) -> dict:
        return {k: v for k, v in self.settings().items()
                if k in ("model", "onnx", "imgsz", "calibration_method", "calibration_percentile", "calib_images",
                         "calib_seed", "nodes_to_exclude", "op_types_to_exclude", "high_precision_dtype",
                         "calibration_eps")}

    def replace(self, **changes) -> "Recipe":
        return from_dict({**to_dict(self), **changes})


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


FIELDS = {f.name: f for f in dataclasses.fields(Recipe)}


def from_dict(d: dict, source: str = "recipe") -> Recipe:
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        raise UserError(f"{source}: unknown recipe key(s) {', '.join(unknown)}; valid keys are "
                        f"{', '.join(FIELDS)}")
    if "name" not in d:
        raise UserError(f"{source}: recipe has no `name`; add one")
    d = dict(d)
    for k in ("nodes_to_exclude", "op_types_to_exclude", "calibration_eps", "bench_batches", "notes"):
        if k in d:
            d[k] = tuple(d[k] or ())
    if "layer_precisions" in d:
        try:
            d["layer_precisions"] = tuple(lp if isinstance(lp, LayerPrecision) else LayerPrecision(**lp)
                                          for lp in (d["layer_precisions"] or ()))
        except TypeError as e:
            raise UserError(f"{source}: layer_precisions entries take match, precision, op_type ({e})") from None
    try:
        return Recipe(**d)
    except TypeError as e:
        raise UserError(f"{source}: {e}") from None


def to_dict(r: Recipe) -> dict:
    d = dataclasses.asdict(r)
    d["layer_precisions"] = [dataclasses.asdict(lp) for lp in r.layer_precisions]
    return d


def load(path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe; see recipes/<model>/*.yaml for the ones that exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of keys to values")
    return from_dict(d, str(path))


def dump(r: Recipe) -> str:
    return yaml.safe_dump(to_dict(r), sort_keys=False)
