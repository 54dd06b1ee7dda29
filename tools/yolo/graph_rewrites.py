"""Exact graph rewrites of a YOLO11 detector ONNX (recipe key `graph_rewrites`), made before ModelOpt quantizes it
(int8-qdq) or before TensorRT builds it (fp16), so that TensorRT can fuse what the exported graph makes it copy.

`split-conv`: a convolution whose SiLU output is only split along channels (every C3k2 block's and C2PSA's `cv1`,
`self.cv1(x).chunk(2, 1)` / `.split((c, c), 1)`) becomes one convolution per part, its weights and bias sliced along
the output channels, each with its own SiLU (Sigmoid, Mul: as exported). Each Mul writes the tensor the Split part
was, so every consumer reads what it read before, and no Split view feeds the block's Concat: TensorRT can write each
branch straight into the Concat's buffer instead of copying the halves (results/yolo11n/profile/b32-L3: Concat
input copies, 0.28 ms in the INT8 engines). A convolution computes each output channel on its own, so the parts are
the same numbers.
`head-split`: the Detect head concatenates each level's box (64 channels) and class (80) outputs, reshapes each level
to [N, 144, H*W], concatenates the levels and splits box from class again. Rewritten, each level's box and class
outputs are reshaped apart and the levels concatenated per branch: the same tensors without the 144-channel
Concat and its Split (pure data movement, bit-identical). The head's Shape nodes, which read the per-level Concat for
its batch and grid size, read the box branch's output instead (same dims but the channel count, which they do not
read).

Neither rewrite changes the quantization rules TensorRT applies (tools/yolo/qdq_rules.py): the split-conv Concats still get
one scale with `qdq_rewrites: [concat]`, and the Mul outputs keep the Split outputs' names, so calibration scales
stay with the tensors they were measured on.
ultralytics 8.4 exports the head that way already (yolo11s/m here); the shipped yolo11n.onnx, an older export, does
not. So head-split changes the shipped model and leaves a newer export as it is.
The command line is tools/graph_rewrites.py; the pipeline names the rewritten model by Layout.rewritten_onnx.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tools.core.errors import UserError
from tools.core.files import atomic_path, file_digest, write_json
from tools.core.layout import Layout
from tools.core.recipe import GRAPH_REWRITES
from tools.yolo.graph import head_block, load



def _index(graph):
    producer = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers


def _attr(node, name, default=None):

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _replace_nodes(graph, removed: set[str], new_nodes: dict[str, list]) -> None:
    """Drop the nodes named in `removed`; `new_nodes[name]` go where node `name` stood (kept in topological order:
    each group is placed at the last node it replaces)."""
    nodes = []
    for n in graph.node:
        nodes += new_nodes.get(n.name, [])
        if n.name not in removed:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)


def prune(graph) -> None:
    """Remove nodes whose outputs nothing reads, initializers no node reads and value_info of tensors no longer made."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)
    made = {o for n in graph.node for o in n.output}
    for info in [v for v in graph.value_info if v.name not in made]:
        graph.value_info.remove(info)


def split_conv(model) -> list[str]:
    """Rewrite `split-conv` in place (see the module docstring); returns the Split nodes removed."""

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer, consumers = _index(graph)
    outputs = {o.name for o in graph.output}
    removed, new_nodes, changed = set(), {}, []
    for split in [n for n in graph.node if n.op_type == "Split"]:
        mul = producer.get(split.input[0])
        if mul is None or mul.op_type != "Mul" or len(consumers[mul.output[0]]) != 1:
            continue
        sig = next((producer[i] for i in mul.input if i in producer and producer[i].op_type == "Sigmoid"), None)
        if sig is None:
            continue
        conv = producer.get(sig.input[0])
        if conv is None or conv.op_type != "Conv" or set(mul.input) != {conv.output[0], sig.output[0]} or \
                len(consumers[conv.output[0]]) != 2 or len(consumers[sig.output[0]]) != 1 or \
                _attr(conv, "group", 1) != 1 or not set(conv.input[1:]) <= set(inits) or \
                outputs & {conv.output[0], sig.output[0], mul.output[0]}:
            continue
        weight = numpy_helper.to_array(inits[conv.input[1]])
        bias = numpy_helper.to_array(inits[conv.input[2]]) if len(conv.input) > 2 and conv.input[2] else None
        if _attr(split, "axis", 0) not in (1, 1 - weight.ndim):  # channels of an N, C, H, W tensor
            continue
        if len(split.input) > 1 and split.input[1]:
            if split.input[1] not in inits:
                continue
            sizes = [int(s) for s in numpy_helper.to_array(inits[split.input[1]])]
        else:
            parts = len(split.output)
            sizes = [weight.shape[0] // parts] * parts if weight.shape[0] % parts == 0 else []
        if sum(sizes) != weight.shape[0]:
            continue
        ends = np.cumsum(sizes)
        group = []
        for k, (start, end) in enumerate(zip(ends - sizes, ends)):
            stem = f"_split{k}"
            w = numpy_helper.from_array(np.ascontiguousarray(weight[start:end]), f"{conv.input[1]}{stem}")
            graph.initializer.append(w)
            args = [conv.input[0], w.name]
            if bias is not None:
                b = numpy_helper.from_array(np.ascontiguousarray(bias[start:end]), f"{conv.input[2]}{stem}")
                graph.initializer.append(b)
                args.append(b.name)
            conv_out, sig_out = f"{conv.output[0]}{stem}", f"{sig.output[0]}{stem}"
            group += [helper.make_node("Conv", args, [conv_out], conv.name + stem, **{
                          a.name: helper.get_attribute_value(a) for a in conv.attribute}),
                      helper.make_node("Sigmoid", [conv_out], [sig_out], sig.name + stem),
                      helper.make_node("Mul", [conv_out, sig_out], [split.output[k]], mul.name + stem)]
        removed |= {conv.name, sig.name, mul.name, split.name}
        new_nodes[split.name] = group
        changed.append(split.name)
    if changed:
        _replace_nodes(graph, removed, new_nodes)
        prune(graph)
    return changed


def _gather_index(graph, inits, node) -> int | None:

    if node.op_type != "Gather" or _attr(node, "axis", 0) != 0 or node.input[1] not in inits:
        return None
    index = numpy_helper.to_array(inits[node.input[1]])
    return int(index) if index.ndim == 0 else None


def head_split(model) -> list[str]:
    """Rewrite `head-split` in place (see the module docstring); returns the Split nodes removed (one per head)."""

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer, consumers = _index(graph)
    outputs = {o.name for o in graph.output}

    def channels(tensor) -> int | None:
        conv = producer.get(tensor)
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in inits:
            return None
        return int(inits[conv.input[1]].dims[0])

    def shape_only(shape_node, skip: int) -> bool:
        """A Shape node whose every reader gathers one dim other than `skip` of it."""
        users = consumers[shape_node.output[0]]
        return shape_node.op_type == "Shape" and len(shape_node.input) == 1 and not shape_node.attribute and \
            bool(users) and all(_gather_index(graph, inits, g) not in (None, skip) for g in users)

    removed, new_nodes, changed, redirect = set(), {}, [], {}
    for split in [n for n in graph.node if n.op_type == "Split"]:
        cat = producer.get(split.input[0])
        if cat is None or cat.op_type != "Concat" or len(consumers[cat.output[0]]) != 1 or cat.output[0] in outputs:
            continue
        if len(split.input) < 2 or split.input[1] not in inits or _attr(split, "axis", 0) != 1 or \
                _attr(cat, "axis") not in (2, -1):
            continue
        sizes = [int(s) for s in numpy_helper.to_array(inits[split.input[1]])]
        levels = []  # (level Concat, its Reshape) per input of the levels' Concat
        for name in cat.input:
            reshape = producer.get(name)
            level = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
            if level is None or level.op_type != "Concat" or _attr(level, "axis") != 1 or \
                    [channels(t) for t in level.input] != sizes or consumers[name] != [cat]:
                break
            others = [c for c in consumers[level.output[0]] if c is not reshape]
            if not all(shape_only(c, 1) for c in others):
                break
            levels.append((level, reshape, others))
        else:
            group = []
            for j, size in enumerate(sizes):
                shape = numpy_helper.from_array(np.array([0, size, -1], np.int64), f"{split.name}/part{j}/shape")
                graph.initializer.append(shape)
                parts = []
                for level, reshape, _ in levels:
                    parts.append(f"{reshape.output[0]}_part{j}")
                    group.append(helper.make_node("Reshape", [level.input[j], shape.name], [parts[-1]],
                                                  f"{reshape.name}_part{j}"))
                group.append(helper.make_node("Concat", parts, [split.output[j]], f"{cat.name}_part{j}",
                                              axis=_attr(cat, "axis")))
            for level, reshape, others in levels:
                redirect.update({s.name: level.input[0] for s in others})
                removed |= {level.name, reshape.name}
            removed |= {cat.name, split.name}
            new_nodes[split.name] = group
            changed.append(split.name)
    if changed:
        for n in graph.node:
            if n.name in redirect:
                n.input[0] = redirect[n.name]
        _replace_nodes(graph, removed, new_nodes)
        prune(graph)
    return changed


def splits_into_concat(graph) -> int:
    """Concat inputs that are a Split's output: what split-conv removes."""
    producer, _ = _index(graph)
    return sum(1 for n in graph.node if n.op_type == "Concat" for i in n.input
               if i in producer and producer[i].op_type == "Split")


def head_splits(graph) -> int:
    """Split nodes in the Detect head: what head-split removes."""

    head = head_block([n.name for n in graph.node])
    return sum(1 for n in graph.node if n.op_type == "Split" and n.name.startswith(f"/model.{head}/"))


# each rewrite and what is left of its target (0: the graph has the rewritten form, as it stands or after it)
REWRITE_FUNCTIONS = {"split-conv": (split_conv, splits_into_concat), "head-split": (head_split, head_splits)}


def apply(model, rewrites, source: str = "model") -> dict[str, list[str]]:
    """Apply the named rewrites in place, in the order given; {rewrite: nodes it removed}. A graph already in a
    rewrite's form gets none from it (ultralytics 8.4 exports the head with box and class concatenated apart, so
    head-split removes nothing there); one where the rewrite leaves its target in place is an error naming `source`:
    the recipe would claim a graph it does not have."""
    unknown = [r for r in rewrites if r not in REWRITE_FUNCTIONS]
    if unknown:
        raise UserError(f"{source}: unknown graph rewrite(s) {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(GRAPH_REWRITES)}")
    changed = {}
    for r in rewrites:
        rewrite, left = REWRITE_FUNCTIONS[r]
        changed[r] = rewrite(model)
        if left(model.graph):
            raise UserError(f"{source}: graph rewrite {r!r} cannot rewrite {left(model.graph)} of the places it is "
                            f"for (not a YOLO11 detector as ultralytics exports it?); drop it from the recipe's "
                            f"graph_rewrites")
    return changed


def rewritten(layout: Layout, source, rewrites) -> Path:
    """`source` with `rewrites` applied, made where missing under the name Layout.rewritten_onnx gives it, with a JSON
    beside it saying what changed; `source` itself where there are none."""
    source, out = Path(source), layout.rewritten_onnx(source, rewrites)
    if not rewrites or out.is_file():
        return out
    model = load(source)
    before = len(model.graph.node)
    changed = apply(model, list(rewrites), str(source))
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    write_json(out.with_suffix(".json"), {"source": layout.rel(source), "source_sha256": file_digest(source),
                                          "graph_rewrites": list(rewrites), "removed": changed,
                                          "nodes": {"before": before, "after": len(model.graph.node)}})
    return out
