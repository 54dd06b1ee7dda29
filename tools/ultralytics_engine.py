"""Ultralytics drop-in engines: a copy of an engine with the metadata header ultralytics' TensorRT backend reads.

Ultralytics' own `.engine` export is a 4-byte little-endian length, that many bytes of JSON metadata and then the
serialized engine (ultralytics/utils/export/engine.py, onnx2engine); `YOLO("x.engine")` reads the header
(ultralytics/nn/backends/base.py, engine_header), deserializes what follows and takes names, stride, task, batch,
imgsz and args.dynamic from it (apply_metadata). A trtexec engine has no header: ultralytics loads it with
placeholder class names and batch 1, and so cannot feed a batch-32 engine. This tool writes a copy with the header,
its metadata taken from the ultralytics export's ONNX metadata_props and from the engine's profile; the engine
trtexec wrote stays as it was (its keys and timings refer to it). The repo's own engine readers take both forms
through `engine_bytes`.

Only engines of the raw head are drop-ins: ultralytics feeds float32 NCHW images scaled to 0..1 and runs its own NMS,
so an engine built from an ONNX with another input type or with NMS inside is refused.
Usage: python -m tools.ultralytics_engine ENGINE -o OUT.engine --onnx MODEL.onnx --batch 32   (one engine)
       python -m tools.ultralytics_engine --recipe RECIPE.yaml [--profiles b32]            (a run's engines)
       python -m tools.ultralytics_engine ENGINE                                          (print its header)
"""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import onnx

from tools.core.cli import add_model, add_profiles, add_results, image_size, positive_int
from tools.core.errors import UserError, run_main
from tools.core.files import REPO, atomic_path
from tools.core.layout import Layout
from tools.core.recipe import from_dict, load
from tools.core.record import engine_id, newest_per, read_records
from tools.yolo import graph as yolo_graph

# A header is a few kB of JSON and opens with "{"; a TensorRT plan opens with a four-letter magic tag, which read as
# a length is over 500 MB: a first word below this is a header's length.
HEADER_MAX = 1 << 24
# The keys ultralytics' exporter writes (engine/exporter.py, Exporter.metadata): only these are copied from the ONNX,
# since apply_metadata sets every key as an attribute of the backend.
EXPORT_KEYS = ("description", "author", "date", "version", "license", "docs", "stride", "task", "head", "batch",
               "imgsz", "names", "args", "channels", "end2end")
LITERAL_KEYS = ("stride", "batch", "imgsz", "names", "args", "channels", "end2end")  # Python reprs in the ONNX
FLOAT_INPUTS = ("FLOAT", "FLOAT16")  # the input types ultralytics' backend feeds (float16: it halves its input)


def split(data: bytes, where) -> tuple[dict, bytes]:
    """(header metadata, engine bytes) of a file's content: ({}, data) when it has no header; a header whose length
    or JSON is broken is a one-line error naming `where`."""
    n = int.from_bytes(data[:4], "little")
    if not (0 < n < HEADER_MAX and data[4:5] == b"{"):
        return {}, data
    fix = "rewrite it from the trtexec engine (make ultralytics, python -m tools.ultralytics_engine)"
    if 4 + n > len(data):
        raise UserError(f"{where}: its metadata header claims {n} bytes but only {len(data) - 4} follow: a truncated "
                        f"or damaged ultralytics engine; {fix}")
    try:
        meta = json.loads(data[4:4 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise UserError(f"{where}: its metadata header ({n} bytes) is not a JSON object: a damaged ultralytics engine; "
                        f"{fix}")
    if 4 + n == len(data):
        raise UserError(f"{where}: holds a metadata header and no engine after it; {fix}")
    return meta, data[4 + n:]


def read(path) -> tuple[dict, bytes]:
    """(metadata, engine bytes) of an engine file, with or without ultralytics' header ({} without)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such engine; build it first (make engine)")
    return split(path.read_bytes(), path)


def engine_bytes(path) -> bytes:
    """What TensorRT deserializes from an engine file: the file itself, or what follows its ultralytics header."""
    return read(path)[1]


def write(engine, metadata: dict, out) -> Path:
    """Write `engine` (bytes, or a path to an engine file; a header it has already is replaced) with `metadata` as
    ultralytics' header into `out`, atomically."""
    payload = engine_bytes(engine) if isinstance(engine, (str, Path)) else split(bytes(engine), "engine bytes")[1]
    header = json.dumps(metadata).encode()  # ASCII (ensure_ascii): ultralytics' len(str) is the same length
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(len(header).to_bytes(4, "little") + header + payload)
    return out


# ----------------------------------------------------------------------------------------------------------------
def onnx_metadata(onnx_path) -> dict:
    """Ultralytics' export metadata from an ONNX's metadata_props, with the values it stores as Python reprs parsed
    back (names, imgsz, args, ...), as ultralytics' apply_metadata does."""
    props = {p.key: p.value for p in yolo_graph.load(onnx_path).metadata_props}
    missing = [k for k in ("stride", "task", "names") if k not in props]
    if missing:
        raise UserError(f"{onnx_path}: has no ultralytics metadata ({', '.join(missing)} missing from its "
                        f"metadata_props); pass the ONNX ultralytics exported (make export PT=model.pt)")
    meta = {k: props[k] for k in EXPORT_KEYS if k in props}
    for k in LITERAL_KEYS:
        if k in meta:
            try:
                meta[k] = ast.literal_eval(meta[k])
            except (ValueError, SyntaxError):
                raise UserError(f"{onnx_path}: metadata {k}={meta[k][:60]!r} is not what ultralytics writes; "
                                f"re-export the model (make export PT=model.pt)") from None
    return meta


def check_source(onnx_path, classes: int) -> None:
    """The engine's ONNX must take float images and end in the raw head (4 box rows + one row per class): what
    ultralytics' TensorRT backend feeds and decodes."""
    value_info, _, out = yolo_graph.io_layout(yolo_graph.load(onnx_path), onnx_path)
    dtype = onnx.TensorProto.DataType.Name(value_info.type.tensor_type.elem_type)
    if dtype not in FLOAT_INPUTS:
        raise UserError(f"{onnx_path}: takes {dtype} input, not float: ultralytics' TensorRT backend "
                        f"feeds float32 images scaled to 0..1, so this engine is no drop-in; build one from a recipe "
                        f"without the end-to-end deploy option")
    if out[1] != 4 + classes:
        raise UserError(f"{onnx_path}: output {out} is not the raw head of {classes} classes ([N,{4 + classes},"
                        f"anchors]; NMS inside?): ultralytics runs its own NMS on the raw head, so this engine is no "
                        f"drop-in; build one from a recipe without the end-to-end deploy option")


def metadata(model_onnx, batch: int, dynamic: bool, imgsz: int | None = None, quantize: int | None = None,
             source_onnx=None) -> dict:
    """The header of an engine built from `source_onnx` (default: `model_onnx`, the ultralytics export whose metadata
    is copied) for batches up to `batch` (`dynamic`: from 1 up), at `imgsz` (default: the export's), in `quantize`
    bits (8 or 16, as ultralytics' args record it). AutoBackend.forward reads args.dynamic: it pads or splits every
    call to `batch` for a static engine and passes any batch through to a dynamic one."""
    meta = onnx_metadata(model_onnx)
    if meta["task"] != "detect" or meta.get("end2end"):
        raise UserError(f"{model_onnx}: a {meta['task']} model{' with NMS inside' if meta.get('end2end') else ''}; "
                        f"these recipes build detectors with the raw head: pass a YOLO11 detection export")
    check_source(source_onnx or model_onnx, len(meta["names"]))
    size = [imgsz, imgsz] if imgsz else list(meta.get("imgsz", [640, 640]))
    args = {"batch": batch, "dynamic": dynamic, "quantize": quantize, "nms": False}
    return {**meta, "batch": batch, "imgsz": size, "args": args, "end2end": False}


def from_records(recipe_path, results, profiles=None, root=REPO, model=None) -> list[Path]:
    """`make ultralytics`: a drop-in copy of each of RECIPE's engines, from the newest record of each deployment
    profile, beside the engine (in the checkout `root`); `model`: the size, as tools/core/recipe.py's load takes it."""
    recipe = load(recipe_path, model)
    if recipe.deploy is not None:
        raise UserError(f"{recipe_path}: an end-to-end recipe (deploy: uint8 pixels in{', NMS inside' if recipe.deploy.nms else ''}); "
                        f"ultralytics feeds float32 NCHW and decodes the raw head itself: use the recipe without "
                        f"`deploy` (e.g. {recipe.name.removesuffix('-e2e')}.yaml)")
    layout = Layout(recipe.model, root, Path(results).resolve())
    found = newest_per((r for r in read_records(layout.points) if "build" in r), engine_id)
    written = []
    for profile in profiles or recipe.profiles:
        if profile not in recipe.profiles:
            raise UserError(f"{recipe_path}: has no profile {profile!r}; its profiles are {', '.join(recipe.profiles)}")
        rec = found.get((recipe.name, profile, recipe.builder_optimization_level))
        if rec is None:
            raise UserError(f"{layout.points}: no engine of recipe {recipe.name!r} [{profile}]; build it first "
                            f"(make engine RECIPE={recipe_path} MODEL={recipe.model})")
        ran, p = from_dict(rec["recipe"], str(recipe_path)), rec["profile"]  # the recipe as the run adapted it
        engine = layout.resolve(rec["build"]["engine"])
        # a profile starting above batch 1 would refuse ultralytics' single images: padded to its largest batch instead
        meta = metadata(ran.onnx_path, p["max"], p["min"] == 1 < p["max"], ran.imgsz,
                        8 if ran.precision.startswith("int8") else 16, layout.resolve(rec["onnx"]))
        written.append(write(engine, meta, layout.ultralytics_engine(engine)))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.ultralytics_engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", nargs="?", help="an engine file (without -o: print its header)")
    ap.add_argument("-o", "--out", help="the copy with ultralytics' header to write")
    ap.add_argument("--onnx", help="with -o: the ultralytics export whose metadata the header copies")
    ap.add_argument("--source-onnx", help="with -o: the ONNX the engine was built from, if not --onnx (Q/DQ model)")
    ap.add_argument("--batch", type=positive_int, help="with -o: the largest batch of the engine's profile")
    ap.add_argument("--dynamic", action="store_true", help="with -o: the engine's profile takes every batch from 1")
    ap.add_argument("--imgsz", type=image_size, help="with -o: the engine's image size (default: the export's)")
    ap.add_argument("--quantize", type=int, choices=(8, 16), help="with -o: 8 for an INT8 engine, 16 for FP16")
    ap.add_argument("--recipe", help="write the copies of this recipe's engines, read from the run's records")
    add_model(ap)  # with --recipe
    add_profiles(ap)  # with --recipe
    add_results(ap, overwrite=False)  # with --recipe
    args = ap.parse_args(argv)
    if args.recipe:
        outs = from_records(args.recipe, args.results, args.profiles.split(",") if args.profiles else None,
                            model=args.model)
    elif args.engine and args.out:
        if not (args.onnx and args.batch):
            raise UserError("with -o, give --onnx MODEL.onnx (the ultralytics export) and --batch N (the profile's "
                            "largest batch)")
        meta = metadata(args.onnx, args.batch, args.dynamic, args.imgsz, args.quantize, args.source_onnx)
        outs = [write(args.engine, meta, args.out)]
    elif args.engine:
        meta, payload = read(args.engine)
        print(json.dumps({"header": meta or None, "engine_bytes": len(payload)}))
        return
    else:
        raise UserError("give ENGINE -o OUT.engine --onnx MODEL.onnx --batch N, --recipe RECIPE.yaml, or ENGINE alone "
                        "to print its header")
    for out in outs:
        print(f"wrote {out}: load it with ultralytics as YOLO({str(out)!r}, task='detect') and pass rect=False to "
              f"predict/val (README, 'For ultralytics users')")


if __name__ == "__main__":
    run_main(main)
