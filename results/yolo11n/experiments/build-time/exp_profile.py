"""Per-layer profile (IProfiler) + engine inspector JSON of an engine at a static batch, for parser fixtures."""
import json, sys, time
import numpy as np
import tensorrt as trt
from polygraphy import cuda

engine_path, batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
logger = trt.Logger(trt.Logger.WARNING)
engine = trt.Runtime(logger).deserialize_cuda_engine(open(engine_path, "rb").read())
insp = engine.create_engine_inspector()
open(out + ".layers.json", "w").write(insp.get_engine_information(trt.LayerInformationFormat.JSON))
ctx = engine.create_execution_context()
names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
bufs = {}
for n in names:
    if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
        ctx.set_input_shape(n, (batch, 3, 640, 640))
for n in names:
    shape = tuple(ctx.get_tensor_shape(n))
    bufs[n] = cuda.DeviceArray(shape=shape, dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(n))))
    ctx.set_tensor_address(n, bufs[n].ptr)
class Prof(trt.IProfiler):
    def __init__(self):
        trt.IProfiler.__init__(self); self.t = {}; self.order = []
    def report_layer_time(self, name, ms):
        if name not in self.t: self.t[name] = []; self.order.append(name)
        self.t[name].append(ms)
stream = cuda.Stream()
for _ in range(20): ctx.execute_async_v3(stream.ptr)
stream.synchronize()
p = Prof(); ctx.profiler = p
for _ in range(50):
    ctx.execute_async_v3(stream.ptr); stream.synchronize()
rows = [{"name": n, "medianMs": float(np.median(p.t[n])), "averageMs": float(np.mean(p.t[n])), "count": len(p.t[n])} for n in p.order]
json.dump(rows, open(out + ".profile.json", "w"), indent=1)
print(out, "layers", len(rows), "sum median ms", round(sum(r["medianMs"] for r in rows), 3))
