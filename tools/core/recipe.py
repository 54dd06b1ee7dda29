"""Recipes: one YAML file per configuration, validated against one typed schema.

Every key has a type and a range; a wrong one is a one-line error naming the file, the key and the fix. Each field
says which pipeline stage it shapes (calib, quantize, engine) and for which precisions, so the cache key of every
stage is derived from the fields themselves (`Recipe.settings`), never from a hand-kept list. A recipe states its
precision once; `trt_plan` (tools/trt_plan.py) maps it onto the TensorRT version at hand. `profiles` names the
engines a recipe deploys: one TensorRT optimization profile each, each timed at the batches it was built for.
"""
from __future__ import annotations

import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, \
    field_validator, model_validator

from tools.core.errors import UserError
from tools.core.files import REPO

PRECISIONS = ("fp16", "int8-qdq", "int8-implicit")
CALIBRATION_METHODS = ("entropy", "max", "mse", "percentile")
STAGES = ("calib", "quantize", "engine")  # in pipeline order: a stage's key holds its own fields and the earlier ones
QDQ, CALIBRATED = ("int8-qdq",), ("int8-qdq", "int8-implicit")
# engine I/O formats the host can feed and read (trtexec --inputIOFormats/--outputIOFormats): linear NCHW in float32
# or float16 (an INT8 input, e.g. int8:chw32, would need the host to quantize with the engine's input scale)
IO_FORMATS = ("fp32:chw", "fp16:chw")
FLOAT_IO = IO_FORMATS[0]  # the ONNX's own float32 I/O: no trtexec flag, and what Polygraphy feeds and reads
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # recipe and profile names become file names
# the Q/DQ placement rewrites a recipe may name (`qdq_rewrites`); tools/yolo/qdq_rules.py implements each
REWRITES = ("concat",)
# the exact graph rewrites a recipe may name (`graph_rewrites`); tools/yolo/graph_rewrites.py implements each
GRAPH_REWRITES = ("split-conv", "head-split")


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{pattern!r} is not a regular expression ({e})") from None
    return pattern


Regex = Annotated[StrictStr, AfterValidator(_regex)]
Batch = Annotated[StrictInt, Field(ge=1, le=4096)]


def shaped(stage: str, precisions: tuple[str, ...] = PRECISIONS, when: tuple[str, str] | None = None,
           omit_default: bool = False, **kw):
    """A field that shapes `stage`'s artifacts for `precisions` (and so belongs to their cache keys); `when`
    (key, value): only while another field has that value; `omit_default`: only when set to something other than
    its default (a field added later, whose default is the old behaviour, leaves existing keys and names alone)."""
    return Field(json_schema_extra={"stage": stage, "precisions": precisions, "when": when,
                                    "omit_default": omit_default}, **kw)


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerPrecision(Frozen):
    """TensorRT layers whose name matches `match` (regex, searched) and, if given, whose ONNX op type is `op_type`
    run in `precision`: trtexec --layerPrecisions/--layerOutputTypes --precisionConstraints=obey."""
    match: Regex
    precision: Literal["fp32", "fp16"]
    op_type: StrictStr | None = None


class Profile(Frozen):
    """One engine: a TensorRT optimization profile over the batch dimension. `{batch: 32}` is a static engine;
    `{min: 1, opt: 8, max: 32}` a dynamic one. `bench`: the batches it is timed at (default: min, opt and max)."""
    min: Batch
    opt: Batch
    max: Batch
    bench: tuple[Batch, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _static(cls, data):
        if isinstance(data, dict) and "batch" in data:
            data = dict(data)
            batch = data.pop("batch")
            data.update(min=batch, opt=batch, max=batch)
        return data

    @model_validator(mode="after")
    def _ranges(self):
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        if not self.bench:
            object.__setattr__(self, "bench", tuple(sorted({self.min, self.opt, self.max})))
        if any(not self.min <= b <= self.max for b in self.bench):
            raise ValueError(f"bench batches {list(self.bench)} must lie in [{self.min}, {self.max}]: an engine is "
                             f"timed only at shapes it was built for")
        return self

    @property
    def static(self) -> bool:
        return self.min == self.max

    def describe(self) -> str:
        return f"static batch {self.min}" if self.static else f"dynamic batch {self.min}-{self.max} (opt {self.opt})"


class Nms(Frozen):
    """NMS inside the engine (TensorRT's EfficientNMS_TRT plugin). The defaults are ultralytics val's thresholds, so
    the engine is scored like the raw one; a deployment raises `conf` (ultralytics predict: 0.25)."""
    conf: Annotated[float, Field(ge=0, lt=1)] = 0.001
    iou: Annotated[float, Field(gt=0, le=1)] = 0.7
    max_det: Annotated[StrictInt, Field(ge=1, le=4096)] = 300  # the plugin sorts at most 4096 candidates


class Deploy(Frozen):
    """The end-to-end engine (tools/deploy_graph.py): it takes the letterboxed image as a camera gives it (uint8 RGB,
    NHWC or NCHW) and does the cast, /255 and layout change itself; with `nms`, it returns the detections."""
    input: Literal["uint8-nhwc", "uint8-nchw"] = "uint8-nhwc"
    nms: Nms | None = None

    @property
    def layout(self) -> str:
        return self.input.split("-")[1]


class Recipe(Frozen):
    # --- identity (not hashed: the model's bytes are, see tools/core/files.py) -------------------------------------
    name: Annotated[StrictStr, Field(pattern=NAME)]
    model: Annotated[StrictStr, Field(pattern=NAME)] = "yolo11n"  # models/yolo11/<model>.onnx unless `onnx` says;
    # recipe files leave it to MODEL= (load() below) unless they fit one size only
    description: StrictStr = ""
    onnx: StrictStr | None = None
    notes: tuple[StrictStr, ...] = ()  # free-form provenance (e.g. what was changed to build on TensorRT 8.6)
    imgsz: Annotated[StrictInt, Field(ge=32, le=4096, multiple_of=32)] = shaped("calib", default=640)
    # --- engine precision: fp16 | int8-qdq (ModelOpt Q/DQ + FP16) | int8-implicit (TensorRT calibrator) --------
    precision: Literal[PRECISIONS] = shaped("engine", default="fp16")
    # --- calibration images (int8-qdq and int8-implicit) --------------------------------------------------------
    calib_images: Annotated[StrictInt, Field(ge=1)] = shaped("calib", CALIBRATED, default=400)
    calib_seed: Annotated[StrictInt, Field(ge=0)] = shaped("calib", CALIBRATED, default=0)
    # --- ModelOpt ONNX PTQ (int8-qdq only) ------------------------------------------------------------------
    calibration_method: Literal[CALIBRATION_METHODS] = shaped("quantize", QDQ, default="entropy")
    # percentile calibration: amax keeps this percentile of |x| per tensor (tools/yolo/calibrators.py)
    calibration_percentile: Annotated[float, Field(gt=0, le=100)] = \
        shaped("quantize", QDQ, when=("calibration_method", "percentile"), default=99.99)
    nodes_to_exclude: tuple[Regex, ...] = shaped("quantize", QDQ, default=())
    op_types_to_exclude: tuple[StrictStr, ...] = shaped("quantize", QDQ, default=())
    # what TensorRT 10 gets; 8.6 needs fp32 and 11 fp16 (tools/trt_plan.py)
    high_precision_dtype: Literal["fp32", "fp16"] = shaped("quantize", QDQ, default="fp32")
    # Q/DQ placement rewrites after ModelOpt (tools/yolo/qdq_rules.py): `concat` gives every input of a quantized Concat
    # its output's scale (exact; lets TensorRT concatenate in INT8)
    qdq_rewrites: tuple[Literal[REWRITES], ...] = shaped("quantize", QDQ, omit_default=True, default=())
    # exact graph rewrites of the FP32 model before ModelOpt (int8-qdq) or the engine build (fp16), in the order
    # given (tools/yolo/graph_rewrites.py): `split-conv` (cv1 + Split -> one conv per part), `head-split` (the head's box
    # and class branches concatenated apart)
    graph_rewrites: tuple[Literal[GRAPH_REWRITES], ...] = \
        shaped("quantize", ("fp16", "int8-qdq"), omit_default=True, default=())
    calibration_eps: tuple[Annotated[StrictStr, Field(pattern=r"^(cpu|trt|cuda:\d+|dml:\d+)$")], ...] = \
        shaped("quantize", QDQ, default=("cpu",))
    # --- TensorRT implicit INT8 (int8-implicit only; TensorRT <= 10) ----------------------------------------
    implicit_calibrator: Literal["minmax", "entropy"] = shaped("engine", ("int8-implicit",), default="minmax")
    # --- builder ---------------------------------------------------------------------------------------------
    layer_precisions: tuple[LayerPrecision, ...] = shaped("engine", default=())
    builder_optimization_level: Annotated[StrictInt, Field(ge=0, le=5)] = shaped("engine", default=3)
    timing_cache: StrictBool = shaped("engine", default=True)
    # end-to-end engine: uint8 input, optionally NMS inside (None: the raw head on float input, as before)
    deploy: Deploy | None = shaped("engine", omit_default=True, default=None)
    # the engine's input and output tensors' type and layout (trtexec --inputIOFormats / --outputIOFormats): fp16:chw
    # takes the reformat of `images` out of the engine (the host writes float16) or lets the head's decode end in
    # FP16 (not exact: box coordinates near 640 px keep 0.5 px); the runners read the engine's types and follow
    input_io_format: Literal[IO_FORMATS] = shaped("engine", omit_default=True, default=FLOAT_IO)
    output_io_format: Literal[IO_FORMATS] = shaped("engine", omit_default=True, default=FLOAT_IO)
    # --- deployment profiles: one engine each (part of each engine's own key, see engine_settings) --------------
    profiles: dict[Annotated[StrictStr, Field(pattern=NAME)], Profile] = \
        Field(default_factory=lambda: {"b1": Profile(min=1, opt=1, max=1), "b32": Profile(min=32, opt=32, max=32)},
              min_length=1)

    # ---------------------------------------------------------------------------------------------------------
    @property
    def onnx_path(self) -> Path:
        return REPO / (self.onnx or f"models/yolo11/{self.model}.onnx")

    @property
    def quantized(self) -> bool:
        return self.precision == "int8-qdq"

    @property
    def calibrated(self) -> bool:
        return self.precision in CALIBRATED

    @property
    def float_io(self) -> bool:
        """The engine takes and returns the ONNX's float32 tensors (input_io_format, output_io_format at fp32:chw)."""
        return self.input_io_format == self.output_io_format == FLOAT_IO

    @field_validator("deploy")
    @classmethod
    def _deployable(cls, deploy, info):
        if deploy is not None and info.data.get("precision") == "int8-implicit":
            raise ValueError("deploy needs precision fp16 or int8-qdq: the end-to-end graph renames the float input "
                             "whose scale an implicit-INT8 calibration cache holds")
        return deploy

    @field_validator("graph_rewrites")
    @classmethod
    def _rewritable(cls, rewrites, info):
        if rewrites and info.data.get("precision") == "int8-implicit":
            raise ValueError("graph_rewrites needs precision fp16 or int8-qdq: an implicit-INT8 calibration cache "
                             "holds the scales of the exported graph's tensors")
        if len(set(rewrites)) != len(rewrites):
            raise ValueError("a rewrite is named twice; name each once")
        return rewrites

    @field_validator("input_io_format", "output_io_format")
    @classmethod
    def _io_format(cls, value, info):
        deploy = info.data.get("deploy")
        if value != FLOAT_IO and deploy is not None and (info.field_name == "input_io_format" or deploy.nms):
            raise ValueError(f"an end-to-end engine (deploy) has its own {info.field_name.split('_')[0]} types "
                             f"(uint8 pixels in, NMS outputs out); leave {info.field_name} at fp32:chw")
        return value

    def settings(self, upto: str = "engine") -> dict:
        """The fields that shape the artifacts of stage `upto` and every earlier stage, for this precision, as
        plain JSON: what that stage's cache key hashes (beside the content digests of its inputs)."""
        out = {}
        for name, f in type(self).model_fields.items():
            meta = f.json_schema_extra or {}
            if not meta or STAGES.index(meta["stage"]) > STAGES.index(upto) or self.precision not in meta["precisions"]:
                continue
            if meta["when"] is None or getattr(self, meta["when"][0]) == meta["when"][1]:
                if not self.at_omitted_default(name):
                    out[name] = _plain(getattr(self, name))
        return out

    def at_omitted_default(self, name: str) -> bool:
        """An `omit_default` field at its default: neither in keys nor in sweep point names."""
        f = type(self).model_fields[name]
        return bool((f.json_schema_extra or {}).get("omit_default")) and getattr(self, name) == f.get_default(
            call_default_factory=True)

    def engine_settings(self, profile: str) -> dict:
        """What one engine of this recipe is built from: the engine-stage settings and that profile's shapes."""
        p = self.profiles[profile]
        return {**self.settings("engine"), "profile": {"min": p.min, "opt": p.opt, "max": p.max}}

    def replace(self, **changes) -> "Recipe":
        return from_dict({**to_dict(self), **changes}, f"recipe {self.name!r}")


def _plain(value):
    return json.loads(json.dumps(value.model_dump() if isinstance(value, BaseModel) else value,
                                 default=lambda v: v.model_dump()))


FIELDS = tuple(Recipe.model_fields)
HINTS = {
    "precision": f"one of {', '.join(PRECISIONS)}",
    "calibration_method": f"one of {', '.join(CALIBRATION_METHODS)}",
    "qdq_rewrites": f"a YAML list of: {', '.join(REWRITES)}",
    "calibration_percentile": "a percentile in (0, 100], e.g. 99.99",
    "calib_images": "a whole number of images >= 1, e.g. 400",
    "builder_optimization_level": "a whole number 0..5 (TensorRT's default is 3), unquoted",
    "nodes_to_exclude": "a YAML list of node-name regexes, e.g. ['/model\\.10/.*attn.*']",
    "op_types_to_exclude": "a YAML list of ONNX op types, e.g. [Sigmoid]",
    "profiles": "a mapping of names to {batch: N} or {min: A, opt: B, max: C, bench: [..]}",
    "layer_precisions": "a list of {match: regex, precision: fp16|fp32, op_type: Conv}",
    "imgsz": "a multiple of 32, e.g. 640",
    "deploy": "{input: uint8-nhwc | uint8-nchw, nms: {conf: 0.001, iou: 0.7, max_det: 300} or null}",
    "graph_rewrites": f"a YAML list of: {', '.join(GRAPH_REWRITES)}",
    "input_io_format": f"one of {', '.join(IO_FORMATS)}",
    "output_io_format": f"one of {', '.join(IO_FORMATS)}",
}


def validation_message(source: str, err: ValidationError, hints: dict = HINTS, valid_keys=FIELDS) -> str:
    """pydantic's first error as one line: file, key, what is wrong, what was given, how to fix it."""
    errors = err.errors()
    e = errors[0]
    loc = ".".join(str(x) for x in e["loc"])
    top = str(e["loc"][0]) if e["loc"] else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key `{loc}`; valid keys are {', '.join(valid_keys)}{more}"
    if e["type"] == "missing":
        return f"{source}: key `{loc}` is required; add it{more}"
    msg = e["msg"].removeprefix("Value error, ").replace("a valid tuple", "a list")
    hint = f"; expected {hints[top]}" if top in hints else ""
    return f"{source}: key `{loc}`: {msg} (got {e['input']!r}){hint}{more}"


def from_dict(d: dict, source: str = "recipe") -> Recipe:
    if not isinstance(d, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping of keys to values")
    try:
        return Recipe.model_validate(d)
    except ValidationError as e:
        raise UserError(validation_message(source, e)) from None


def to_dict(r: Recipe) -> dict:
    return _plain(r)


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys: `precision:` twice made an int8-qdq recipe FP16 without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # SafeLoader names that problem itself
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path, what: str):
    """A YAML file's content, or one line naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeys)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e}); fix the syntax") from None


def load(path, model: str | None = None) -> Recipe:
    """The recipe in `path` for `model` (make's MODEL=, a tool's --model, a grid's `model:`; None: the recipe's own,
    else yolo11n). A recipe names a `model:` only where it fits that one size alone, and then refuses another."""
    data = read_yaml(path, "recipe; see recipes/*.yaml for the ones that exist")
    if model is not None and isinstance(data, dict):
        own = data.get("model")
        if own is None:
            data = {**data, "model": model}
        elif own != model:
            raise UserError(f"{path}: is a recipe for {own} only (its `model:`); run it with MODEL={own} (--model "
                            f"{own}), or remove its `model:` line if it fits every size")
    return from_dict(data, str(path))


def dump(r: Recipe) -> str:
    """The recipe as YAML, without the `omit_default` fields at their default (as the recipe files leave them out)."""
    return yaml.safe_dump({k: v for k, v in to_dict(r).items() if not r.at_omitted_default(k)}, sort_keys=False)
