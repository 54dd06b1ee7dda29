"""Q/DQ placement rewrites after ModelOpt, from TensorRT's explicit-quantization rules (recipe key `qdq_rewrites`).

`concat`: a Concat whose only consumer quantizes its output gets that QuantizeLinear's scale on every input: each
input goes through Q/DQ at the output's scale (an input already dequantized at another scale is requantized). Per
tensor, quantizing the inputs at one scale and concatenating is the same arithmetic as concatenating and quantizing
the result, so the model computes exactly what it did; what changes is that TensorRT sees a Concat whose inputs and
output share one scale, which it can run in INT8 without requantizing or copying between formats (ModelOpt leaves
the Split and residual-Add inputs of YOLO11's C3k2 Concats in float, and the neck's Concats mix scales).
Applied by tools.quantize after ModelOpt; `python -m tools.qdq_rules` applies them to a Q/DQ model file.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from onnx import helper, numpy_helper

from tools.core.errors import UserError
from tools.core.recipe import REWRITES


def quantize_concat_inputs(model) -> list[str]:
    """Rewrite `concat` in place (see the module docstring); returns the Concat nodes rewritten."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}

    def value(name: str):
        init = initializers.get(name)  # a scale computed in the graph has no value here: it matches nothing
        return None if init is None else np.asarray(numpy_helper.to_array(init)).item()

    def scale_and_zero(node) -> tuple:
        """A Q or DQ node's (scale, zero point) as numbers: equal pairs quantize alike whatever their names."""
        return value(node.input[1]), value(node.input[2]) if len(node.input) > 2 and node.input[2] else 0

    producer = {o: n for n in graph.node for o in n.output}
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    rewritten, new_nodes = [], {}
    for concat in (n for n in graph.node if n.op_type == "Concat"):
        users = consumers[concat.output[0]]
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or concat.output[0] in outputs:
            continue
        q = users[0]
        scale, zero, target = q.input[1], q.input[2] if len(q.input) > 2 else "", scale_and_zero(q)
        inserted = []
        for k, name in enumerate(concat.input):
            if not name or name in initializers:
                continue
            dq = producer.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and scale_and_zero(dq) == target:
                continue  # already at the output's scale
            stem = f"{concat.name}/input{k}"
            qargs, attrs = [name, scale] + ([zero] if zero else []), {a.name: helper.get_attribute_value(a)
                                                                      for a in q.attribute}
            inserted += [helper.make_node("QuantizeLinear", qargs, [f"{stem}_quantized"], f"{stem}_QuantizeLinear",
                                          **attrs),
                         helper.make_node("DequantizeLinear", [f"{stem}_quantized", scale] + ([zero] if zero else []),
                                          [f"{stem}_dequantized"], f"{stem}_DequantizeLinear",
                                          **{a: v for a, v in attrs.items() if a == "axis"})]
            concat.input[k] = f"{stem}_dequantized"
        if inserted:
            new_nodes[concat.name] = inserted
            rewritten.append(concat.name)
    if new_nodes:  # keep the node list topologically sorted: the new pairs go right before their Concat
        nodes = []
        for n in graph.node:
            nodes += new_nodes.get(n.name, []) if n.op_type == "Concat" else []
            nodes.append(n)
        del graph.node[:]
        graph.node.extend(nodes)
    return rewritten


def apply(model, rewrites) -> dict[str, list[str]]:
    """Apply the named rewrites in place; {rewrite: nodes it changed}."""
    unknown = [r for r in rewrites if r not in REWRITES]
    if unknown:
        raise UserError(f"unknown Q/DQ rewrite(s) {', '.join(unknown)}; known: {', '.join(REWRITES)}")
    return {r: quantize_concat_inputs(model) for r in rewrites if r == "concat"}
