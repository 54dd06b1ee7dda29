"""Per-layer profile of TensorRT engines: where the time goes, by YOLO block, layer kind and precision.

Reads what `trtexec --exportLayerInfo --exportProfile` writes (NVIDIA's trtexec or our fallback): the engine
inspector's layer JSON (engine built with --profilingVerbosity=detailed) and the per-layer times. Each layer gets
a kind (conv, reformat, qdq, ...), a precision (from its tensors' Format/Datatype), the ONNX nodes fused into it
and the YOLO block (`/model.K/`) they come from; the Detect head (the block with `/dfl/` nodes) is split into its
box (cv2), class (cv3), DFL and decode parts. Writes a CSV per engine, a by-block side-by-side CSV, a markdown
summary and a plot.

Usage: python -m tools.profile --layers A.layers.json --profile A.profile.json [--layers B... --profile B...]
         --labels fp16,int8-qdq -o OUTDIR          (.json.gz files are read as well)
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tools.common import UserError, atomic_path, run_main, write_text
from tools.engine import run_logged, shape
from tools.recipe import add_model_arg
from tools.trtlog import parse_file, to_csv
from tools.yolo_graph import block_of

# Layer kinds, in the order tables and plots show them. "none": TensorRT runs nothing (constants, elided copies).
KINDS = ("conv", "matmul", "softmax", "pointwise", "pooling", "resize", "myelin", "shuffle", "reformat", "qdq",
         "other", "none")
PRECISIONS = ("int8", "fp16", "fp32", "mixed", "none")  # others (bf16, fp8, int32 ...) get columns when present
FLOAT_TYPES = ("int8", "fp16", "bf16", "fp32", "fp8")
HEAD_PARTS = ("cv2", "cv3", "dfl", "decode")  # Detect head: box branch, class branch, DFL, box/anchor decode
OTHER = "other"


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple
    format: str  # TensorRT's "Format/Datatype" text, e.g. "Thirty-two wide channel vectorized row major Int8 format"


@dataclass(frozen=True)
class Layer:
    name: str
    layer_type: str
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()
    tactic: str = ""
    metadata: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Reading
def _load_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; write it with trtexec {what} (or `make profile`)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        # strict=False: TensorRT 8.6 writes raw \x1e control characters into the Metadata strings
        return json.loads(text, strict=False)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg}, line {e.lineno}); export it again with trtexec {what}") from None


def _tensor(d: dict) -> Tensor:
    fmt = d.get("Format/Datatype") or " ".join(filter(None, (d.get("Format"), d.get("Datatype"))))
    return Tensor(d.get("Name", ""), tuple(d.get("Dimensions", ())), fmt)


def read_layers(path) -> list[Layer]:
    """Engine-inspector JSON (trtexec --exportLayerInfo, TensorRT 8.6 / 10.x, strict or not) -> layers in
    execution order."""
    data = _load_json(path, "--exportLayerInfo")
    layers = data.get("Layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not layers:
        raise UserError(f"{path}: has no 'Layers' list; give the file trtexec --exportLayerInfo writes")
    if all(isinstance(x, str) for x in layers):
        raise UserError(f"{path}: lists layer names only; rebuild the engine with --profilingVerbosity=detailed "
                        f"so the layer info has formats, tactics and ONNX nodes")
    if not all(isinstance(d, dict) and "Name" in d for d in layers):
        raise UserError(f"{path}: a 'Layers' entry without a Name; give the file trtexec --exportLayerInfo writes")
    return [Layer(d["Name"], d.get("LayerType", ""), tuple(map(_tensor, d.get("Inputs", ()))),
                  tuple(map(_tensor, d.get("Outputs", ()))), _tactic(d), d.get("Metadata") or "") for d in layers]


def _tactic(d: dict) -> str:
    """The kernel's name; else its tactic id, unless that is 0x0 (layers without tactics: copies, constants)."""
    value = d.get("TacticValue", "")
    return d.get("TacticName") or ("" if re.fullmatch(r"(0x)?0*", value) else value)


def read_profile(path) -> dict[str, float]:
    """trtexec --exportProfile JSON -> {layer name: ms per run}: the median where the file has one (TensorRT
    >= 8.6), else the average."""
    data = _load_json(path, "--exportProfile")
    records = [r for r in data if isinstance(r, dict) and "name" in r] if isinstance(data, list) else []
    if not records:
        raise UserError(f"{path}: no per-layer records; give the file trtexec --exportProfile writes")
    times = {}
    for r in records:
        ms = r.get("medianMs", r.get("averageMs"))
        if ms is None:
            raise UserError(f"{path}: layer {r['name']!r} has neither medianMs nor averageMs; export it again")
        times[r["name"]] = times.get(r["name"], 0.0) + float(ms)  # a name listed twice ran twice per inference
    return times


def profile_runs(path) -> int | None:
    """How many profiled inferences the per-layer times come from ({"count": N} in trtexec's export)."""
    data = _load_json(path, "--exportProfile")
    return next((r["count"] for r in data if isinstance(r, dict) and "count" in r), None)


# ----------------------------------------------------------------------------------------------------------------
# Classification
ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
ONNX_PATH = re.compile(r"/[\w.]+(?:/[\w.]+)*")
COPY_NODE = re.compile(r"^Reformatting CopyNode for (Input|Output) Tensor (\d+) to (.+)$")
QDQ_NAME = re.compile(r"(Quantize|Dequantize)Linear(_clone_\d+)*$")


def onnx_nodes(layer: Layer) -> list[str]:
    """The ONNX nodes fused into a layer: from its Metadata (detailed verbosity, TensorRT >= 8.6), else the
    ONNX-style paths in its name."""
    return ONNX_LAYER.findall(layer.metadata) or ONNX_PATH.findall(layer.name)


def dtype(fmt: str) -> str:
    """'Channel major FP16 format where channel % 8 == 0' -> 'fp16' (TensorRT 10's kgen layers say 'Half')."""
    words = fmt.lower().replace(".", " ").split()
    for name, spellings in (("int8", ("int8",)), ("fp16", ("fp16", "half")), ("bf16", ("bfloat16",)),
                            ("fp32", ("fp32", "float")), ("fp8", ("fp8",)), ("int32", ("int32",)),
                            ("int64", ("int64",)), ("bool", ("bool",)), ("uint8", ("uint8",))):
        if any(s in words for s in spellings):
            return name
    return "unknown"


VECTOR_WIDTH = {"two": 2, "four": 4, "sixteen": 16, "thirty-two": 32}


def short_format(fmt: str) -> str:
    """TensorRT's format text in tensor-layout shorthand: 'int8 NC/32HW32', 'fp16 NHWC8', 'fp32 NCHW'."""
    low, dt = fmt.lower(), dtype(fmt)
    if m := re.match(r"([a-z-]+) wide channel vectorized", low):
        k = VECTOR_WIDTH.get(m.group(1), m.group(1))
        return f"{dt} NC/{k}HW{k}"
    if low.startswith("channel major"):
        m = re.search(r"channel (?:%|==) (\d+)", low)
        return f"{dt} NHWC{m.group(1) if m else ''}"
    if low.startswith("row major"):
        return f"{dt} NCHW"
    return fmt


def layer_kind(layer: Layer) -> str:
    t = layer.layer_type.lower()
    if t in ("constant", "noop", "shape", "assertion", "signal", "wait"):
        return "none"  # NoOp includes the copy nodes TensorRT found it could elide: they take no time
    if COPY_NODE.match(layer.name):
        return "reformat"
    parts = onnx_nodes(layer) if layer.metadata else layer.name.split(" + ")
    if t in ("quantize", "dequantize") or (parts and all(QDQ_NAME.search(p.strip()) for p in parts)):
        return "qdq"  # a standalone Q/DQ (or a DQ+Q requantize, LayerType Scale), not one fused into a conv
    if t == "reformat":
        return "reformat"  # TensorRT's copy kernel: format changes, concat/split copies, copies of reshapes
    if "myelin" in t or "kgen" in t or "foreignnode" in layer.name.lower():
        return "myelin"
    for kind, keys in (("conv", ("conv",)), ("matmul", ("matrixmultiply", "gemm", "matmul")),
                       ("softmax", ("softmax",)), ("pooling", ("pool",)), ("resize", ("resize",)),
                       ("pointwise", ("pointwise", "elementwise", "activation", "scale", "unary")),
                       ("shuffle", ("shuffle", "slice", "gather", "concatenation", "padding"))):
        if any(k in t for k in keys):
            return kind
    return "other"


def layer_precision(layer: Layer, kind: str) -> str:
    """Compute layers: the type of their inputs (an INT8 conv with an FP32 output still runs INT8 math).
    Conversions: their one type, or 'mixed' where input and output types differ."""
    if kind == "none":
        return "none"
    tensors = layer.inputs + layer.outputs if kind in ("reformat", "qdq") else (layer.inputs or layer.outputs)
    types = {dtype(t.format) for t in tensors}
    floats = types & set(FLOAT_TYPES) or types - {"unknown"}
    if not floats:
        return "none"
    return floats.pop() if len(floats) == 1 else "mixed"


def _block_and_part(nodes: list[str], head: str | None) -> tuple[str | None, str]:
    blocks = [f"model.{k}" for n in nodes if (k := block_of(n)) is not None]
    if not blocks:
        return None, ""
    block = Counter(blocks).most_common(1)[0][0]  # ties: the first one met (most_common is stable)
    if block != head:
        return block, ""
    for n in nodes:
        sub = n.split("/")[2] if n.count("/") >= 2 else ""
        if sub == "dfl" or re.fullmatch(r"cv[23]\.\d+", sub):
            return block, sub.split(".")[0]
    return block, "decode"


def assign_blocks(layers: list[Layer]) -> list[tuple[str, str]]:
    """(block, head part) of every layer. Its own ONNX nodes first; a reformat copy node gets the block of the
    layer it converts for; what is still unknown takes the block of a layer that consumes its output (else of
    the one that produces its input); what stays unknown is 'other'."""
    # A requantize (DQ + Q) belongs where its Quantize points: the consumer that chose the scale (a concat)
    nodes = [onnx_nodes(x)[::-1] if layer_kind(x) == "qdq" else onnx_nodes(x) for x in layers]
    head = next((b for ns in nodes for n in ns if "/dfl/" in n and (b := _block_and_part([n], None)[0])), None)
    by_name = {x.name: i for i, x in enumerate(layers)}
    out: list[tuple[str | None, str]] = [_block_and_part(ns, head) for ns in nodes]
    for i, x in enumerate(layers):
        if m := COPY_NODE.match(x.name):
            target = by_name.get(m.group(3))
            out[i] = out[target] if target is not None else _block_and_part(ONNX_PATH.findall(m.group(3)), head)
    consumers, producers = defaultdict(list), {}
    for i, x in enumerate(layers):
        for t in x.inputs:
            consumers[t.name].append(i)
        for t in x.outputs:
            producers[t.name] = i
    changed = True
    while changed:  # neighbours of neighbours: a constant feeding an unnamed slice feeding the head
        changed = False
        for i, x in enumerate(layers):
            if out[i][0] is None:
                near = [j for t in x.outputs for j in consumers[t.name]] + \
                       [producers[t.name] for t in x.inputs if t.name in producers]
                if found := next((out[j] for j in near if out[j][0] is not None), None):
                    out[i], changed = found, True
    return [(b or OTHER, p) for b, p in out]


def block_label(row: dict) -> str:
    return f"{row['block']}/{row['branch']}" if row["branch"] else row["block"]


def block_order(label: str) -> tuple:
    m = re.match(r"model\.(\d+)(?:/(\w+))?", label)
    if not m:
        return (1, 0, 0, label)
    part = m.group(2) or ""
    return (0, int(m.group(1)), HEAD_PARTS.index(part) + 1 if part in HEAD_PARTS else 0, label)


# ----------------------------------------------------------------------------------------------------------------
# Tables
def _tensors_text(tensors) -> str:
    return "; ".join(f"{short_format(t.format)} {'x'.join(map(str, t.dims))}".strip() for t in tensors)


def profile_table(layers: list[Layer], times: dict[str, float]) -> list[dict]:
    """One row per layer in execution order (name, block, kind, precision, ms, tactic, fused ONNX nodes, formats).
    A timed name the layer info lacks (layer info of another build?) still gets a row, classified by its name."""
    known = {x.name for x in layers}
    layers = layers + [Layer(n, "") for n in times if n not in known]
    rows = []
    for x, (block, part) in zip(layers, assign_blocks(layers)):
        kind = layer_kind(x)
        rows.append({"name": x.name, "block": block, "branch": part, "kind": kind,
                     "precision": layer_precision(x, kind), "ms": times.get(x.name, 0.0),
                     "layer_type": x.layer_type, "tactic": x.tactic, "onnx_nodes": " ".join(onnx_nodes(x)),
                     "inputs": _tensors_text(x.inputs), "outputs": _tensors_text(x.outputs)})
    return rows


def load(layers_path, profile_path) -> list[dict]:
    """profile_table() of one engine's two exports, refusing a pair from different engines."""
    layers, times = read_layers(layers_path), read_profile(profile_path)
    unknown = set(times) - {x.name for x in layers}
    if len(unknown) > len(times) / 2:
        raise UserError(f"{profile_path}: {len(unknown)} of its {len(times)} layers are not in {layers_path}; "
                        f"export both from one engine, in one trtexec run")
    return profile_table(layers, times)


def _precisions(rows) -> list[str]:
    seen = {r["precision"] for r in rows}
    return list(PRECISIONS) + sorted(seen - set(PRECISIONS))


def _ms(rows, **match) -> float:
    return sum((r["ms"] for r in rows if all(r[k] == v for k, v in match.items())), 0.0)


def _sums(rows, precisions) -> dict:
    d = {"ms": _ms(rows), "layers_run": sum(r["kind"] != "none" for r in rows)}
    d.update({f"{k}_ms": _ms(rows, kind=k) for k in KINDS[:-1]})
    d.update({f"{p}_ms": _ms(rows, precision=p) for p in precisions})
    d["reformat_n"] = sum(r["kind"] == "reformat" for r in rows)
    d["int8_conv_ms"] = _ms(rows, kind="conv", precision="int8")
    return d


def by_block(rows: list[dict]) -> list[dict]:
    """Per block (head split into its parts): total ms, ms by kind, ms by precision, reformat count and ms."""
    groups = defaultdict(list)
    for r in rows:
        groups[block_label(r)].append(r)
    precisions = _precisions(rows)
    return [{"block": b, **_sums(groups[b], precisions)} for b in sorted(groups, key=block_order)]


def totals(rows: list[dict]) -> dict:
    return {"block": "all", **_sums(rows, _precisions(rows))}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def compare(rows_a: list[dict], rows_b: list[dict], labels=("a", "b")) -> list[dict]:
    """Two engines' layer rows side by side by block, then 'all': ms each and the speed-up a/b, conv ms and its
    speed-up, reformat ms and count, b's Q/DQ ms and ms by precision (the FP16/FP32 'islands' of an INT8 b), and
    `above_2x_ms`: b's ms above half of a's, what keeps b from a 2x speed-up; and `conv_bound_speedup`: the speed-up
    b would reach with its convolutions as they are and every other layer at exactly half of a's time, the most that
    removing b's reformats, Q/DQ and float islands can bring while the convolutions gain only what they gain."""
    la, lb = labels
    ta, tb = {r["block"]: r for r in by_block(rows_a)}, {r["block"]: r for r in by_block(rows_b)}
    ta["all"], tb["all"] = totals(rows_a), totals(rows_b)
    empty = {"ms": 0.0}
    out = []
    for block in sorted((set(ta) | set(tb)) - {"all"}, key=block_order) + ["all"]:
        a, b = ta.get(block, empty), tb.get(block, empty)
        row = {"block": block, f"ms_{la}": a["ms"], f"ms_{lb}": b["ms"], "speedup": _ratio(a["ms"], b["ms"]),
               f"conv_ms_{la}": a.get("conv_ms", 0.0), f"conv_ms_{lb}": b.get("conv_ms", 0.0),
               "conv_speedup": _ratio(a.get("conv_ms", 0.0), b.get("conv_ms", 0.0)),
               f"reformat_ms_{la}": a.get("reformat_ms", 0.0), f"reformat_ms_{lb}": b.get("reformat_ms", 0.0),
               f"reformat_n_{la}": a.get("reformat_n", 0), f"reformat_n_{lb}": b.get("reformat_n", 0),
               f"qdq_ms_{lb}": b.get("qdq_ms", 0.0)}
        for p in ("int8", "fp16", "fp32", "mixed"):
            row[f"{p}_ms_{lb}"] = b.get(f"{p}_ms", 0.0)
        row[f"not_int8_share_{lb}"] = _ratio(b["ms"] - b.get("int8_ms", 0.0), b["ms"])
        row["above_2x_ms"] = b["ms"] - a["ms"] / 2
        row["conv_bound_speedup"] = _ratio(a["ms"], b.get("conv_ms", 0.0) + (a["ms"] - a.get("conv_ms", 0.0)) / 2)
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Markdown
def _md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v).replace("|", "\\|"))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


def short_name(row: dict, width: int = 70) -> str:
    """A layer in a few words: its first fused ONNX node, or the copy node's target, or the name."""
    name = row["name"]
    if m := COPY_NODE.match(name):
        target = ONNX_PATH.findall(m.group(3))
        name = f"copy {m.group(1).lower()} {m.group(2)} of {target[0] if target else m.group(3)}"
    elif row["onnx_nodes"] and row["kind"] not in ("reformat", "qdq"):
        nodes = row["onnx_nodes"].split()
        name = nodes[0] + (f" (+{len(nodes) - 1})" if len(nodes) > 1 else "")
    return name if len(name) <= width else name[:width - 3] + "..."


def _share(x: float, total: float) -> str:
    return f"{x:.3f} ({100 * x / total:.0f}%)" if total else f"{x:.3f}"


def summary_md(engines: list[tuple[str, list[dict]]], e2e_ms: dict | None = None, runs: dict | None = None,
               top: int = 12) -> str:
    """Markdown: totals, time by kind and precision, the answer to 'where does INT8 lose its 2x' (each later
    engine against the first), the top reformat layers and the FP16/FP32 islands of INT8 engines."""
    e2e_ms, runs = e2e_ms or {}, runs or {}
    labels = [lab for lab, _ in engines]
    tot = {lab: totals(rows) for lab, rows in engines}
    out = [f"# Per-layer profile: {' vs '.join(labels)}", "",
           "Per-layer medians from TensorRT's profiler (trtexec --exportProfile, a run apart from the timing runs). "
           "Profiling synchronises after every layer, so the sum of layer medians differs from the end-to-end "
           "median: read shares and ratios, not absolute sums. Blocks are YOLO11's `/model.K/` modules; "
           "the Detect head is split into cv2 (box branch), cv3 (class branch), dfl and decode.", "",
           "## Totals", ""]
    rows = []
    for lab, rows_ in engines:
        t = tot[lab]
        elided = sum(r["kind"] == "none" and COPY_NODE.match(r["name"]) is not None for r in rows_)
        rt = sum(r["layer_type"] == "Reformat" for r in rows_)
        rt_ms = sum(r["ms"] for r in rows_ if r["layer_type"] == "Reformat")
        rows.append([lab, runs.get(lab), t["layers_run"], t["ms"], e2e_ms.get(lab), t["conv_ms"], t["int8_conv_ms"],
                     f"{t['reformat_ms']:.3f} ({t['reformat_n']})", t["qdq_ms"], f"{rt_ms:.3f} ({rt})", elided])
    out += [_md_table(["engine", "profiled runs", "layers run", "sum of layer medians ms", "end-to-end median ms",
                       "conv ms", "INT8 conv ms", "reformat ms (n)", "Q/DQ ms", "LayerType Reformat ms (n)",
                       "copy nodes elided (NoOp)"], rows), "",
            "`reformat`: TensorRT's copy kernels (inserted format/precision changes, concat/split copies, copies of "
            "reshapes); `qdq`: standalone Quantize/Dequantize/requantize layers (some run as Reformat layers: the "
            "last-but-one column counts both).", "", "## Time by kind (ms, share of the engine)", ""]
    kinds = [k for k in KINDS[:-1] if any(tot[lab][f"{k}_ms"] for lab in labels)]
    out += [_md_table(["kind", *labels], [[k, *(_share(tot[lab][f"{k}_ms"], tot[lab]["ms"]) for lab in labels)]
                                          for k in kinds]), "", "## Time by precision (ms, share)", ""]
    precs = [p for p in _precisions([r for _, rs in engines for r in rs])
             if any(tot[lab].get(f"{p}_ms") for lab in labels)]
    out += [_md_table(["precision", *labels], [[p, *(_share(tot[lab].get(f"{p}_ms", 0.0), tot[lab]["ms"])
                                                    for lab in labels)] for p in precs]), ""]
    base_label, base = engines[0]
    for lab, rows_ in engines[1:]:
        out += _lose_2x_md(base_label, base, lab, rows_)
    out += _causes_md(engines)
    for lab, rows_ in engines:
        out += _top_reformats_md(lab, rows_, top)
    for lab, rows_ in engines:
        if tot[lab]["int8_conv_ms"]:
            out += _islands_md(lab, rows_)
    return "\n".join(out) + "\n"


def _lose_2x_md(la: str, rows_a: list[dict], lb: str, rows_b: list[dict]) -> list[str]:
    cmp = compare(rows_a, rows_b, (la, lb))
    ta, tb = totals(rows_a), totals(rows_b)
    parts = sorted(((k, tb[f"{k}_ms"] - ta[f"{k}_ms"] / 2) for k in KINDS[:-1]), key=lambda kv: -abs(kv[1]))
    why = ", ".join(f"{k} {v:+.3f}" for k, v in parts if abs(v) >= 0.005)
    out = [f"## Where does {lb} lose its 2x over {la}", "",
           f"- Sum of layer medians: {la} {ta['ms']:.3f} ms, {lb} {tb['ms']:.3f} ms: {_ratio(ta['ms'], tb['ms'])}x "
           f"(2x would be {ta['ms'] / 2:.3f} ms).",
           f"- Convolutions: {ta['conv_ms']:.3f} -> {tb['conv_ms']:.3f} ms: {_ratio(ta['conv_ms'], tb['conv_ms'])}x; "
           f"{tb['int8_conv_ms']:.3f} ms of {lb}'s conv time is INT8.",
           f"- {lb} is {tb['ms'] - ta['ms'] / 2:.3f} ms above half of {la}; by kind ({lb}'s ms minus half of "
           f"{la}'s): {why}.",
           f"- Ceiling set by the convolutions: with {lb}'s convolutions as they are and every other layer at half of "
           f"{la}'s time, the layer sum would be {cmp[-1]['conv_bound_speedup']}x {la}'s; beyond that only faster "
           "INT8 convolutions help.", "",
           "Per block (`above 2x`: ms above half of the reference's block time; `conv x`: conv speed-up):", ""]
    rows = [[r["block"], r[f"ms_{la}"], r[f"ms_{lb}"], r["speedup"], r[f"conv_ms_{la}"], r[f"conv_ms_{lb}"],
             r["conv_speedup"], r[f"reformat_ms_{la}"], r[f"reformat_ms_{lb}"], r[f"qdq_ms_{lb}"],
             r["above_2x_ms"]] for r in cmp]
    return out + [_md_table(["block", f"{la} ms", f"{lb} ms", "speed-up", f"conv {la}", f"conv {lb}", "conv x",
                             f"reformat {la}", f"reformat {lb}", f"Q/DQ {lb}", "above 2x ms"], rows), ""]


def reformat_cause(row: dict) -> str:
    """Why a reformat or Q/DQ layer exists, from its name and fused ONNX nodes."""
    if row["kind"] == "qdq":
        return "quantize / requantize"
    if COPY_NODE.match(row["name"]):
        return "format change between layers"
    ops = {n.rsplit("/", 1)[-1].split("_")[0] for n in row["onnx_nodes"].split()}
    for cause, names in (("concat input copy", {"Concat"}), ("split output copy", {"Split"}),
                         ("copy of a reshape", {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})):
        if ops & names:
            return cause
    return "other copy"


def _causes_md(engines: list[tuple[str, list[dict]]]) -> list[str]:
    causes = defaultdict(lambda: defaultdict(list))
    for lab, rows in engines:
        for r in rows:
            if r["kind"] in ("reformat", "qdq"):
                causes[reformat_cause(r)][lab].append(r)

    def cell(rs):
        changed = sum(r["ms"] for r in rs if r["precision"] == "mixed")
        return f"{_ms(rs):.3f} ({len(rs)}; {changed:.3f} change type)" if rs else "-"
    table = [[c, *(cell(causes[c][lab]) for lab, _ in engines)] for c in sorted(causes, key=lambda c: -sum(
        _ms(rs) for rs in causes[c].values()))]
    return ["## Reformat and Q/DQ time by cause (ms (layers; ms of it changing the data type))", "",
            _md_table(["cause", *(lab for lab, _ in engines)], table), ""]


def _top_reformats_md(label: str, rows: list[dict], top: int) -> list[str]:
    moves = sorted((r for r in rows if r["kind"] in ("reformat", "qdq")), key=lambda r: -r["ms"])[:top]
    table = [[r["ms"], block_label(r), r["kind"], f"{r['inputs']} -> {r['outputs']}", short_name(r)] for r in moves]
    return [f"## Top {len(moves)} reformat and Q/DQ layers of {label}", "",
            _md_table(["ms", "block", "kind", "converts (format, dims)", "layer"], table), ""]


def _islands_md(label: str, rows: list[dict]) -> list[str]:
    """Per block, the time an INT8 engine still spends outside INT8, and the layers that make it."""
    table = []
    for b in by_block(rows):
        members = [r for r in rows if block_label(r) == b["block"]]
        away = sorted((r for r in members if r["precision"] not in ("int8", "none") and r["ms"] > 0),
                      key=lambda r: -r["ms"])
        away_ms = sum(r["ms"] for r in away)
        if away_ms >= 0.005:
            table.append([b["block"], b["ms"], b["int8_ms"], b["fp16_ms"], b["fp32_ms"], b["mixed_ms"],
                          f"{100 * away_ms / b['ms']:.0f}%",
                          "; ".join(f"{short_name(r, 50)} ({r['kind']}, {r['precision']})" for r in away[:3])])
    return [f"## FP16/FP32 islands in {label}", "",
            "Blocks where the INT8 engine still runs FP16/FP32 layers (`mixed`: conversions between types):", "",
            _md_table(["block", "ms", "int8", "fp16", "fp32", "mixed", "not INT8", "largest such layers"], table), ""]


# ----------------------------------------------------------------------------------------------------------------
# Plot
KIND_COLORS = {"conv": "#4c72b0", "matmul": "#64b5cd", "softmax": "#8172b3", "pointwise": "#dd8452",
               "pooling": "#937860", "resize": "#da8bc3", "myelin": "#55a868", "shuffle": "#8c8c8c",
               "reformat": "#c44e52", "qdq": "#ccb974", "other": "#333333"}
PRECISION_COLORS = {"int8": "#55a868", "fp16": "#4c72b0", "fp32": "#c44e52", "mixed": "#ccb974"}


def plot(engines: list[tuple[str, list[dict]]], path) -> None:
    """Stacked bars per block, the engines side by side (plain, hatched, ...): by kind (top) and by precision
    (bottom); above each block the first engine's time over each other's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tables = [(lab, {r["block"]: r for r in by_block(rows)}) for lab, rows in engines]
    blocks = sorted({b for _, t in tables for b in t}, key=block_order)
    n, width, hatches = len(tables), 0.8 / len(tables), ["", "////", "....", "xxxx"]
    top = max(t[b]["ms"] for _, t in tables for b in t)
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.45 * len(blocks) + 3), 9), sharex=True)
    for ax, stacks, colors, title in ((axes[0], KINDS[:-1], KIND_COLORS, "by layer kind"),
                                      (axes[1], tuple(PRECISION_COLORS), PRECISION_COLORS, "by precision")):
        for i, (lab, t) in enumerate(tables):
            xs = [j + (i - (n - 1) / 2) * width for j in range(len(blocks))]
            bottom = [0.0] * len(blocks)
            for s in stacks:
                h = [t[b].get(f"{s}_ms", 0.0) if b in t else 0.0 for b in blocks]
                ax.bar(xs, h, width, bottom=bottom, color=colors[s], hatch=hatches[i % len(hatches)],
                       edgecolor="white", linewidth=0.4)
                bottom = [a + c for a, c in zip(bottom, h)]
        used = [s for s in stacks if any(t[b].get(f"{s}_ms", 0) for _, t in tables for b in t)]
        handles = [Patch(color=colors[s], label=s) for s in used]
        handles += [Patch(facecolor="#bbbbbb", edgecolor="white", hatch=hatches[i % len(hatches)],
                          label=f"bar {i + 1}: {lab}") for i, (lab, _) in enumerate(tables)]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1), frameon=False)
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel("ms (sum of layer medians)")
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    base = tables[0][1]
    for j, b in enumerate(blocks):  # speed-up labels: how much each engine gains on the first, per block
        ratios = [f"{base[b]['ms'] / t[b]['ms']:.2f}x" for _, t in tables[1:] if b in base and t.get(b, {}).get("ms")]
        if ratios:
            height = max(t[b]["ms"] for _, t in tables if b in t)
            axes[0].text(j, height + top * 0.01, "\n".join(ratios), ha="center", va="bottom", fontsize=7)
    axes[1].set_xticks(range(len(blocks)))
    axes[1].set_xticklabels(blocks, rotation=60, ha="right", fontsize=8)
    fig.suptitle("Per-layer time by YOLO block: " + " vs ".join(lab for lab, _ in tables)
                 + (f" (above the bars: {tables[0][0]} ms / " + ", ".join(lab for lab, _ in tables[1:]) + " ms)"
                    if n > 1 else ""))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Reports
def side_by_side(engines: list[tuple[str, list[dict]]]) -> list[dict]:
    """By-block table: one engine's by_block rows; else the first compared with each other one, joined by block.
    Comparison columns carry the compared engine's label (`speedup_int8-qdq`) however many engines there are, so
    readers of the CSV (the report, tools.sizes) need no case per engine count."""
    if len(engines) == 1:
        return by_block(engines[0][1]) + [totals(engines[0][1])]
    base_label, base = engines[0]
    merged: dict[str, dict] = {}
    for lab, rows in engines[1:]:
        for r in compare(base, rows, (base_label, lab)):
            merged.setdefault(r["block"], {}).update(
                {(k if k == "block" or k.endswith((base_label, lab)) else f"{k}_{lab}"): v for k, v in r.items()})
    return list(merged.values())


def read_by_block(path) -> dict[str, dict[str, str]]:
    """A by-block.csv that `report` wrote, as {block: its row} (the totals under "all"), values as written."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such profile table; write it with `make profile RECIPE=...`")
    with open(path, newline="") as f:
        return {r["block"]: r for r in csv.DictReader(f)}


def _rounded(rows: list[dict]) -> list[dict]:
    return [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def report(pairs: list[tuple[str, str, str]], out_dir, e2e_ms: dict | None = None, top: int = 12) -> dict:
    """(label, layers JSON, profile JSON) per engine -> OUT_DIR/<label>.layers.csv, by-block.csv, profile.md,
    profile.png, removing other engines' tables from OUT_DIR. e2e_ms: {label: end-to-end median ms} where known.
    Returns the written paths by name."""
    out_dir = Path(out_dir)
    engines, runs, paths = [], {}, {}
    for label, layers_path, profile_path in pairs:
        rows = load(layers_path, profile_path)
        engines.append((label, rows))
        runs[label] = profile_runs(profile_path)
        paths[f"{label}.csv"] = out_dir / f"{label}.layers.csv"
        write_text(paths[f"{label}.csv"], to_csv(_rounded(rows)))
    paths["by_block"] = out_dir / "by-block.csv"
    write_text(paths["by_block"], to_csv(_rounded(side_by_side(engines))))
    paths["summary"] = out_dir / "profile.md"
    write_text(paths["summary"], summary_md(engines, e2e_ms, runs, top))
    paths["plot"] = out_dir / "profile.png"
    plot(engines, paths["plot"])
    # one folder holds one comparison: an engine table left by an earlier one would sit beside a by-block.csv that
    # does not have it, and be read as if it did (the per-layer sensitivity reads them)
    for stale in set(out_dir.glob("*.layers.csv")) - {paths[f"{label}.csv"] for label, _ in engines}:
        stale.unlink()
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Measuring (needs TensorRT and a GPU: NVIDIA's trtexec or tools.trtexec_py, which take the same flags)
def profile_args(engine, batch: int, imgsz: int, layers_json, profile_json, layout: str = "nchw") -> list[str]:
    """trtexec flags: unprofiled timing runs (their median is the end-to-end time), then a profiled run of its own."""
    return [f"--loadEngine={engine}", f"--shapes={shape(batch, imgsz, layout)}", "--noDataTransfers", "--separateProfileRun",
            "--dumpProfile", f"--exportProfile={profile_json}", f"--exportLayerInfo={layers_json}"]


def profile_engine(engine, trtexec: list[str], log_prefix, batch: int, imgsz: int, layout: str = "nchw") -> dict:
    """Profile `engine` (built with --profilingVerbosity=detailed) at one batch size: writes
    <log_prefix>.profile-b<batch>.{log,layers.json,profile.json,layers.csv}; returns a small record for the
    engine's results (paths, sum of layer medians and end-to-end median, ms by kind and precision, reformats)."""
    prefix = f"{log_prefix}.profile-b{batch}"
    log, layers_json, profile_json, csv_path = (Path(prefix + s) for s in (".log", ".layers.json", ".profile.json",
                                                                           ".layers.csv"))
    for p in (layers_json, profile_json):
        p.unlink(missing_ok=True)  # a failed run must not leave an earlier engine's export to be read as this one's
    rc, _ = run_logged(trtexec + profile_args(engine, batch, imgsz, layers_json, profile_json, layout), log)
    if rc != 0 or not (layers_json.is_file() and profile_json.is_file()):
        raise UserError(f"{log}: profiling {engine} at batch {batch} failed (exit {rc}); read the log")
    rows = load(layers_json, profile_json)
    write_text(csv_path, to_csv(_rounded(rows)))
    t = totals(rows)
    return {"batch": batch, "log": str(log), "layers_json": str(layers_json), "profile_json": str(profile_json),
            "csv": str(csv_path), "profiled_runs": profile_runs(profile_json), "layers_run": t["layers_run"],
            "layers_ms": round(t["ms"], 4), "e2e_ms": parse_file(log).get("gpu_median_ms"),
            "ms_by_kind": {k: round(t[f"{k}_ms"], 4) for k in KINDS[:-1] if t[f"{k}_ms"]},
            "ms_by_precision": {p: round(t[f"{p}_ms"], 4) for p in _precisions(rows) if t[f"{p}_ms"]},
            "reformat_n": t["reformat_n"], "reformat_ms": round(t["reformat_ms"], 4)}


def from_records(recipe_paths, results, overwrite: bool = False, profiles=None, top: int = 12, model=None) -> dict:
    """`make profile`: for each deployment profile, the recipes' engines side by side (on `model`, as
    tools.recipe.load takes it), read from the newest record of each recipe that holds a per-layer profile (the
    pipeline's `layers` stage), into <results>/<model>/profile/."""
    from tools.common import REPO
    from tools.records import Layout, engine_id, newest_per, read_records
    from tools.recipe import load as load_recipe
    from tools.summary import bench_row

    recipes = [load_recipe(p, model) for p in recipe_paths]
    layout = Layout(recipes[0].model, REPO, Path(results).resolve(), overwrite)
    found = newest_per((r for r in read_records(layout.points) if "layers" in r), engine_id)
    written = {}
    for profile in profiles or recipes[0].profiles:
        pairs, e2e = [], {}
        for recipe in recipes:
            rec = found.get((recipe.name, profile, recipe.builder_optimization_level))
            if rec is None:
                raise UserError(f"{layout.points}: no per-layer profile of {recipe.name!r} [{profile}] at level "
                                f"{recipe.builder_optimization_level}; run `make profile RECIPE=...` (stage layers)")
            layers = rec["layers"]
            pairs.append((recipe.name, layout.resolve(layers["layers_json"]), layout.resolve(layers["profile_json"])))
            batch = layers["batch"]
            timing = (bench_row(rec, batch, False) or bench_row(rec, batch, True)) if "bench" in rec else None
            if timing:
                e2e[recipe.name] = timing["latency_ms_p50"]
        out = layout.out / "profile" / f"{profile}-L{recipes[0].builder_optimization_level}"
        for tracked in (p for p in out.glob("*") if p.is_file()):
            layout.guard(tracked)
        written[profile] = report(pairs, out, e2e, top)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", help="compare these recipes' profiled engines (from the run's records)")
    add_model_arg(ap)
    ap.add_argument("--results", default="runs", help="with --recipes: the run's results root (default: runs/)")
    ap.add_argument("--profiles", help="with --recipes: comma-separated deployment profiles (default: all)")
    ap.add_argument("--overwrite", action="store_true", help="with --recipes: replace a committed profile")
    ap.add_argument("--layers", action="append", help="trtexec --exportLayerInfo JSON (repeat)")
    ap.add_argument("--profile", action="append", help="trtexec --exportProfile JSON (repeat)")
    ap.add_argument("--labels", help="comma-separated engine names (default: the layer files' names)")
    ap.add_argument("--e2e-ms", help="comma-separated end-to-end GPU medians (ms) to set beside the layer sums")
    ap.add_argument("--top", type=int, default=12, help="reformat layers listed per engine")
    ap.add_argument("-o", "--out-dir", help="where the CSVs, summary and plot go (with --layers/--profile)")
    args = ap.parse_args(argv)
    if args.recipes:
        written = from_records(args.recipes, args.results, args.overwrite,
                               args.profiles.split(",") if args.profiles else None, args.top, args.model)
        for paths in written.values():
            for p in paths.values():
                print(f"wrote {p}")
        return
    if not (args.layers and args.profile and args.out_dir):
        raise UserError("give --recipes R.yaml ..., or --layers/--profile pairs and -o OUTDIR")
    if len(args.layers) != len(args.profile):
        raise UserError(f"{len(args.layers)} --layers but {len(args.profile)} --profile; give one of each per engine")
    labels = args.labels.split(",") if args.labels else [Path(p).name.split(".")[0] for p in args.layers]
    if len(labels) != len(args.layers) or len(set(labels)) != len(labels):
        raise UserError(f"--labels {args.labels!r}: give one distinct name per engine ({len(args.layers)})")
    e2e = {}
    if args.e2e_ms:
        try:
            e2e = dict(zip(labels, map(float, args.e2e_ms.split(",")), strict=True))
        except ValueError:
            raise UserError(f"--e2e-ms {args.e2e_ms!r}: give one number (ms) per engine") from None
    paths = report(list(zip(labels, args.layers, args.profile)), args.out_dir, e2e, args.top)
    for p in paths.values():
        print(f"wrote {p}")


if __name__ == "__main__":
    run_main(main)
