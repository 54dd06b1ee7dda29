"""Q/DQ models with FP16 high precision (ModelOpt --high_precision_dtype fp16: TensorRT 10 and 11): two fixes.

1. ONNX Runtime's CPU QuantizeLinear truncates toward zero when its input is float16 instead of rounding to nearest
   even (the MLFloat16 overload of ParQuantizeLinearStd casts x / scale straight to an integer:
   microsoft/onnxruntime#18576 and #22741, fixed by #32452; 1.24, the version ModelOpt 0.47 pins, truncates, 1.32
   rounds). Every activation and weight of the FP16 flavour then lands up to one step nearer zero, the error
   compounds through the network, and the class scores collapse, while TensorRT rounds correctly. The model is not
   at fault: `for_onnxruntime` gives ONNX Runtime a copy whose QuantizeLinear nodes read float32 (a Cast in front,
   the scale in float32), only where the installed ONNX Runtime is found to truncate. The deployed model keeps its
   float16 QuantizeLinear nodes.
2. A weight channel that is practically zero gets a per-channel scale below FP16's smallest normal number (YOLO11n:
   one channel of the C2PSA qkv conv, scale 3.3e-11 in FP32, whose weights are all below 4.2e-9). ModelOpt stores it
   as the FP16 subnormal 6e-8: zero for a runtime that flushes subnormals, and a reciprocal (1.7e7) beyond FP16's
   range. `clamp_weight_scales` raises such scales to the smallest normal, 2**-14: that channel's weights (stored as
   0 or 6e-8, FP16's smallest subnormal) then quantize to 0 instead of 0 or 1 step, a change of 6e-8 in weights that
   multiply activations of order 1. A guard, not the cause of anything measured: ONNX Runtime scores the same with
   or without it, and TensorRT 8.6's refusal of FP16 scales ("Scale coefficients must all be positive") has another
   cause - its ONNX parser (onnx-tensorrt QuantDequantLinearHelper) reads any scale initializer as float32, so it
   reads FP16 scales as pairs of halves and past their end; later parsers check FP16 scales as FP16.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FP16_MIN_NORMAL = np.float16(2.0 ** -14)


def _initializers(model) -> dict:
    return {i.name: i for i in model.graph.initializer}


def weight_scale_names(model) -> set[str]:
    """Scale initializers of the Q/DQ pairs that quantize weights (QuantizeLinear reading an initializer, and the
    DequantizeLinear after it)."""
    inits = _initializers(model)
    names, q_outputs = set(), set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            names.add(node.input[1])
            q_outputs.add(node.output[0])
    names |= {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_outputs}
    return names


def clamp_weight_scales(model) -> list[dict]:
    """Raise FP16 weight scales below FP16_MIN_NORMAL to it, in place; returns what was changed."""
    inits = _initializers(model)
    changed = []
    for name in sorted(weight_scale_names(model)):
        scale = numpy_helper.to_array(inits[name])
        low = scale < FP16_MIN_NORMAL
        if scale.dtype != np.float16 or not low.any():
            continue
        changed.append({"scale": name, "channels": np.flatnonzero(low).tolist(),
                        "values": [float(v) for v in scale[low]], "to": float(FP16_MIN_NORMAL)})
        inits[name].CopyFrom(numpy_helper.from_array(np.maximum(scale, FP16_MIN_NORMAL), name))
    return changed


# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def onnxruntime_truncates_fp16_quantize() -> bool:
    """Does the installed ONNX Runtime's CPU QuantizeLinear truncate float16 input (2.6 -> 2 instead of 3)?"""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info("q", TensorProto.INT8, [2])],
        [numpy_helper.from_array(np.array(1, np.float16), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    # IR 9 is what opset 19 needs; onnx's default stamp (its newest IR) is more than an older ONNX Runtime loads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q = session.run(None, {"x": np.array([2.6, -2.6], np.float16)})[0]
    return q.tolist() != [3, -3]


def fp32_quantize(model):
    """Copy of `model` whose float16 QuantizeLinear nodes quantize float32: Cast(x) -> QuantizeLinear(scale as
    float32). Same integers as correct float16 rounding, up to ties that float16's coarser x / scale would break
    differently."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = _initializers(model)
    nodes, cast = [], {}  # cast: float16 tensor -> its float32 copy, made once however many nodes quantize it
    for node in model.graph.node:
        scale = inits.get(node.input[1]) if node.op_type == "QuantizeLinear" else None
        if scale is not None and scale.data_type == TensorProto.FLOAT16:  # opset 19: x has the scale's type
            x, s32 = node.input[0], f"{node.input[1]}__fp32_for_ort"
            if s32 not in inits:
                inits[s32] = numpy_helper.from_array(numpy_helper.to_array(scale).astype(np.float32), s32)
                model.graph.initializer.append(inits[s32])
            if x not in cast:
                cast[x] = f"{x}__fp32_for_ort"
                nodes.append(helper.make_node("Cast", [x], [cast[x]], name=f"{cast[x]}__cast", to=TensorProto.FLOAT))
            node.input[0], node.input[1] = cast[x], s32
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]  # the float16 scales only the Q nodes read
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def quantizes_fp16(model) -> bool:
    """Whether any QuantizeLinear of `model` quantizes float16 (its scale is float16)."""
    inits = _initializers(model)
    return any(n.op_type == "QuantizeLinear" and (s := inits.get(n.input[1])) is not None
               and s.data_type == TensorProto.FLOAT16 for n in model.graph.node)


def for_onnxruntime(model):
    """`model` as ONNX Runtime should run it: with float32 QuantizeLinear where this ONNX Runtime truncates float16
    (`model` itself, not a copy, where there is nothing to change)."""
    return fp32_quantize(model) if quantizes_fp16(model) and onnxruntime_truncates_fp16_quantize() else model
