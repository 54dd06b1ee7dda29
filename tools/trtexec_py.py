"""Fallback for NVIDIA's trtexec where it is not installed: the same flags (the subset our recipes use), built and
timed through the TensorRT Python API, printing trtexec's summary lines so one log parser serves both.

It says what it is in its first line: it is not trtexec, and its timings come from its own loop (CUDA events around
each enqueue or CUDA-graph launch on one stream, like trtexec's default), not from trtexec's.
Imports only tensorrt, numpy and polygraphy (for the CUDA runtime); runs under TensorRT 8.6, 10 and 11.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path

import numpy as np
from polygraphy import cuda

from tools.core.errors import UserError, import_tensorrt, run_main
from tools.core.files import atomic_path
from tools.ultralytics_engine import engine_bytes

FLAGS_WITH_VALUE = {"onnx", "saveEngine", "loadEngine", "minShapes", "optShapes", "maxShapes", "shapes", "calib",
                    "builderOptimizationLevel", "timingCacheFile", "precisionConstraints", "layerPrecisions",
                    "layerOutputTypes", "warmUp", "duration", "iterations", "percentile", "device", "avgTiming",
                    "tacticSources", "inputIOFormats", "outputIOFormats"}
# Kernel selection averages this many runs of each tactic: trtexec's --avgTiming default. The builder API's own default
# is 1, and one timing of a few-microsecond batch-1 kernel on a busy host can rank tactics wrongly (README, "Batch 1 is
# fixed": int8-qdq's batch-1 engine ran slower than FP16 with 1, faster with 8); tools.engine passes it explicitly.
AVG_TIMING = 8
SWITCHES = {"fp16", "int8", "stronglyTyped", "skipInference", "useCudaGraph", "noDataTransfers", "verbose",
            "useSpinWait"}


def parse_flags(argv: list[str]) -> dict:
    """trtexec-style `--name=value` / `--switch` arguments -> dict; anything else is refused by name."""
    opts = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"trtexec_py: unexpected argument {arg!r}; flags look like --name=value")
        name, eq, value = arg[2:].partition("=")
        if name in SWITCHES and not eq:
            opts[name] = True
        elif name in FLAGS_WITH_VALUE and eq:
            opts[name] = value
        else:
            raise UserError(f"trtexec_py: flag --{name} is not supported by the fallback; install NVIDIA's trtexec "
                            f"(TRTEXEC=/path/to/trtexec) or drop the flag")
    if ("onnx" in opts) == ("loadEngine" in opts):
        raise UserError("trtexec_py: give exactly one of --onnx=model.onnx or --loadEngine=model.engine")
    check_profiling_flags(opts)
    for flag in ("inputIOFormats", "outputIOFormats"):
        if flag in opts:
            parse_io_formats(flag, opts[flag])  # a misspelt format is refused before TensorRT loads
    return opts


def parse_shapes(spec: str) -> dict[str, tuple[int, ...]]:
    """'images:1x3x640x640,other:2x4' -> {'images': (1, 3, 640, 640), ...}"""
    shapes = {}
    for item in spec.split(","):
        name, _, dims = item.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise UserError(f"trtexec_py: bad shape {item!r}; write name:1x3x640x640") from None
    return shapes


def parse_layer_spec(spec: str | None) -> dict[str, str]:
    """'layerA:fp32,layerB:fp16' -> {'layerA': 'fp32', ...}; layer names may themselves contain ':'."""
    if not spec:
        return {}
    return dict(item.rsplit(":", 1) for item in spec.split(","))


# trtexec's --inputIOFormats/--outputIOFormats spelling -> trt.DataType and trt.TensorFormat member names (bf16, int64
# and fp8 are TensorRT >= 10's: a type or format the TensorRT at hand lacks is refused by name at the build)
IO_TYPES = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16", "int8": "INT8", "int32": "INT32", "int64": "INT64",
            "uint8": "UINT8", "bool": "BOOL", "fp8": "FP8"}
IO_LAYOUTS = {"chw": "LINEAR", "chw2": "CHW2", "chw4": "CHW4", "hwc8": "HWC8", "chw16": "CHW16", "chw32": "CHW32",
              "dhwc8": "DHWC8", "cdhw32": "CDHW32", "hwc": "HWC", "dla_linear": "DLA_LINEAR", "dla_hwc4": "DLA_HWC4",
              "hwc16": "HWC16", "dhwc": "DHWC"}


def parse_io_formats(flag: str, spec: str) -> list[tuple[str, tuple[str, ...]]]:
    """trtexec's `type:fmt[+fmt],type:fmt...` (one entry per network input or output, in order; a single entry applies
    to all) -> [(DataType name, (TensorFormat names, ...)), ...], e.g. 'fp16:chw,int8:chw32+chw4' ->
    [('HALF', ('LINEAR',)), ('INT8', ('CHW32', 'CHW4'))]."""
    out = []
    for item in spec.split(","):
        dtype, _, layouts = item.partition(":")
        names = layouts.split("+") if layouts else []
        if dtype not in IO_TYPES or not names or any(n not in IO_LAYOUTS for n in names):
            raise UserError(f"trtexec_py: --{flag}={spec}: {item!r} is not type:format; types "
                            f"{', '.join(IO_TYPES)}, formats {', '.join(IO_LAYOUTS)} (several joined by +)")
        out.append((IO_TYPES[dtype], tuple(IO_LAYOUTS[n] for n in names)))
    return out


def apply_io_formats(trt, network, opts: dict, strongly_typed: bool) -> list[str]:
    """Set the network's input and output tensors' type and allowed formats as --inputIOFormats/--outputIOFormats say
    (trtexec: one entry per tensor in order, or one for all). A strongly typed network takes its types from the ONNX,
    so there a type other than the tensor's own is refused; its formats still apply. Returns a log line per tensor."""
    lines = []
    for flag, count, get in (("inputIOFormats", network.num_inputs, network.get_input),
                             ("outputIOFormats", network.num_outputs, network.get_output)):
        if flag not in opts:
            continue
        formats = parse_io_formats(flag, opts[flag])
        if len(formats) not in (1, count):
            raise UserError(f"trtexec_py: --{flag} gives {len(formats)} formats for {count} tensors; give one for "
                            f"each, in order, or one for all")
        for i in range(count):
            tensor = get(i)
            dtype_name, layouts = formats[0] if len(formats) == 1 else formats[i]
            missing = [n for enum, names in ((trt.DataType, (dtype_name,)), (trt.TensorFormat, layouts))
                       for n in names if not hasattr(enum, n)]
            if missing:
                raise UserError(f"trtexec_py: --{flag}: TensorRT {trt.__version__} has no {missing[0]}")
            dtype = getattr(trt.DataType, dtype_name)
            if strongly_typed and tensor.dtype != dtype:
                raise UserError(f"trtexec_py: --{flag} asks {dtype_name} for {tensor.name!r}, which the ONNX makes "
                                f"{tensor.dtype}; a strongly typed network takes its types from the ONNX: give the "
                                f"ONNX that type, or drop the type from the flag")
            if not strongly_typed:
                tensor.dtype = dtype
            tensor.allowed_formats = sum(1 << int(getattr(trt.TensorFormat, n)) for n in layouts)
            lines.append(f"[I] {flag}: {tensor.name} {dtype_name} {'+'.join(layouts)}")
    return lines


def buffer_shape(trt, engine, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The elements a tensor's buffer holds: its shape, with a vectorized format's (e.g. CHW32) vectorized dim
    padded to whole vectors, as trtexec allocates it."""
    if engine.get_tensor_format(name) == trt.TensorFormat.LINEAR:  # ask the devkit's 8.6.0 libraries no more than
        return shape  # Polygraphy does (see ../shared/devkit: some 8.6.1 calls are missing there)
    dim = engine.get_tensor_vectorized_dim(name)
    per = engine.get_tensor_components_per_element(name)
    if dim < 0 or per <= 1:
        return shape
    padded = list(shape)
    padded[dim] = -(-padded[dim] // per) * per
    return tuple(padded)


def stats_line(label: str, values_ms: np.ndarray, percentiles) -> str:
    v = np.sort(values_ms)
    pct = ", ".join(f"percentile({p:g}%) = {v[min(len(v) - 1, int(len(v) * p / 100))]:g} ms" for p in percentiles)
    return (f"[I] {label}: min = {v[0]:g} ms, max = {v[-1]:g} ms, mean = {v.mean():g} ms, "
            f"median = {np.median(v):g} ms, {pct}")


# ----------------------------------------------------------------------------------------------------------------
class Fallback:
    """One trtexec run. A build server passes its long-lived builder, its in-memory timing caches (one per builder
    level) and a sink for the log lines; a plain run makes its own and prints."""

    def __init__(self, opts: dict, builder=None, caches: dict | None = None, out=None, logger=None):
        trt = import_tensorrt("python -m tools.trtexec_py")
        self.trt, self.opts = trt, opts
        self.major = int(trt.__version__.split(".")[0])
        self.out = out or (lambda line: print(line, flush=True))
        self.logger = logger or trt.Logger(trt.Logger.VERBOSE if opts.get("verbose") else trt.Logger.WARNING)
        self.builder, self.caches = builder, caches
        # TensorRT's own plugins (EfficientNMS_TRT of an end-to-end engine), as trtexec loads them: the ONNX parser
        # finds a plugin by op type, and an engine holding one deserializes only once they are registered
        trt.init_libnvinfer_plugins(self.logger, "")

    def log(self, line: str):
        self.out(line)

    # --- build ------------------------------------------------------------------------------------------------
    def build(self) -> bytes:
        trt, o = self.trt, self.opts
        builder = self.builder or trt.Builder(self.logger)
        flags = 0
        if self.major < 10:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if o.get("stronglyTyped"):
            if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
                raise UserError(f"trtexec_py: --stronglyTyped needs TensorRT >= 9 (this is {trt.__version__})")
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(o["onnx"]):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"{o['onnx']}: TensorRT's ONNX parser failed: {errors}")
        for line in apply_io_formats(trt, network, o, bool(o.get("stronglyTyped"))):
            self.log(line)
        config = builder.create_builder_config()
        for switch, flag in (("fp16", "FP16"), ("int8", "INT8")):
            if o.get(switch):
                if not hasattr(trt.BuilderFlag, flag):
                    raise UserError(f"trtexec_py: --{switch} does not exist in TensorRT {trt.__version__} "
                                    f"(strongly typed only); bake the precision into the ONNX and use --stronglyTyped")
                config.set_flag(getattr(trt.BuilderFlag, flag))
        if "builderOptimizationLevel" in o:
            config.builder_optimization_level = int(o["builderOptimizationLevel"])
        config.avg_timing_iterations = int(o.get("avgTiming", AVG_TIMING))
        if "tacticSources" in o:
            config.set_tactic_sources(tactic_mask(trt, config.get_tactic_sources(), o["tacticSources"]))
        profile = self._profile(builder, network)
        if profile is not None:
            config.add_optimization_profile(profile)
        if "calib" in o:
            config.int8_calibrator = cache_calibrator(trt, Path(o["calib"]).read_bytes())
            if profile is not None and self.major < 10:
                config.set_calibration_profile(profile)
        self._layer_precisions(network, config)
        self._profiling_verbosity(config)
        cache_path = o.get("timingCacheFile")
        if self.caches is not None:  # build server: the cache of this level lives in memory across builds
            level = config.builder_optimization_level
            if level not in self.caches:
                self.caches[level] = config.create_timing_cache(b"")
            self.log(f"[I] In-memory timing cache for builder level {level}: "
                     f"{len(bytes(self.caches[level].serialize()))} bytes before this build")
            config.set_timing_cache(self.caches[level], ignore_mismatch=False)
            cache_path = None  # TensorRT 8.6 would refuse the file in another process anyway
        elif cache_path:
            blob = Path(cache_path).read_bytes() if Path(cache_path).is_file() else b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
        t0 = time.perf_counter()
        plan = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - t0
        if plan is None:
            raise UserError(f"{o['onnx']}: TensorRT could not build an engine (see the errors above)")
        if cache_path:
            with atomic_path(cache_path) as tmp:
                tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        self.log(f"[I] Engine built in {seconds:.3f} sec.")
        self.log(f"[I] Created engine with size: {plan.nbytes / 2**20:.4f} MiB")
        return bytes(plan)

    def _profile(self, builder, network):
        o = self.opts
        if not any(k in o for k in ("minShapes", "optShapes", "maxShapes")):
            return None
        mins, opts, maxs = (parse_shapes(o.get(k, o.get("optShapes", ""))) for k in
                            ("minShapes", "optShapes", "maxShapes"))
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name not in opts:
                raise UserError(f"trtexec_py: no --optShapes for input {name!r}")
            profile.set_shape(name, mins.get(name, opts[name]), opts[name], maxs.get(name, opts[name]))
        return profile

    def _layer_precisions(self, network, config):
        trt, o = self.trt, self.opts
        precisions = parse_layer_spec(o.get("layerPrecisions"))
        output_types = parse_layer_spec(o.get("layerOutputTypes"))
        if not (precisions or output_types):
            return
        constraint = o.get("precisionConstraints", "none")
        if constraint == "obey":
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        elif constraint == "prefer":
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        dtypes = {"fp32": trt.float32, "fp16": trt.float16, "int8": trt.int8}
        found = set()
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in precisions:
                layer.precision = dtypes[precisions[layer.name]]
                found.add(layer.name)
            if layer.name in output_types:
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, dtypes[output_types[layer.name]])
                found.add(layer.name)
        missing = (set(precisions) | set(output_types)) - found
        if missing:
            raise UserError(f"trtexec_py: --layerPrecisions names no layer of the network: {sorted(missing)[:3]}")
        self.log(f"[I] Layer precision constraints ({constraint}) on {len(found)} layers")

    # --- inference --------------------------------------------------------------------------------------------
    def infer(self, plan: bytes):
        trt, o = self.trt, self.opts
        runtime = trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise UserError(f"{o.get('loadEngine', 'engine')}: TensorRT {trt.__version__} cannot load this engine "
                            f"(built by another TensorRT version or for another GPU); rebuild it here")
        cudart = cuda.wrapper().handle
        free0 = gpu_free_bytes(cudart)
        context = engine.create_execution_context()
        shapes = parse_shapes(o["shapes"]) if "shapes" in o else {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        for name in inputs:
            shape = shapes.get(name, tuple(engine.get_tensor_shape(name)))
            if any(d < 0 for d in shape):
                raise UserError(f"trtexec_py: input {name!r} is dynamic; pass --shapes={name}:1x3x640x640")
            context.set_input_shape(name, shape)
        buffers, hosts = {}, {}
        for name in names:
            shape = buffer_shape(trt, engine, name, tuple(context.get_tensor_shape(name)))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            buffers[name] = cuda.DeviceArray(shape=shape, dtype=dtype)
            hosts[name] = random_input(shape, dtype) if name in inputs else np.empty(shape, dtype)
            context.set_tensor_address(name, buffers[name].ptr)
        stream = cuda.Stream()
        for name in inputs:
            buffers[name].copy_from(hosts[name], stream)
        used_mib = (free0 - gpu_free_bytes(cudart)) / 2**20
        self.layer_info(engine, context)
        self.log(f"[I] Total Activation Memory: {engine.device_memory_size} bytes")
        self.log(f"[I] GPU memory used by engine, context and buffers: {used_mib:.1f} MiB")

        transfers = not o.get("noDataTransfers")

        def enqueue():
            if transfers:
                for name in inputs:
                    buffers[name].copy_from(hosts[name], stream)
            if not context.execute_async_v3(stream.ptr):
                raise UserError("trtexec_py: execute_async_v3 failed")
            if transfers:
                for name in names:
                    if name not in inputs:
                        buffers[name].copy_to(hosts[name], stream)

        launch = enqueue
        graph_exec = None
        if o.get("useCudaGraph"):
            enqueue()  # TensorRT allocates lazily on the first enqueue; that must not happen inside the capture
            stream.synchronize()
            graph_exec = capture_graph(cudart, stream.ptr, enqueue)
            launch = lambda: check(cudart.cudaGraphLaunch(graph_exec, ctypes.c_void_p(stream.ptr)),  # noqa: E731
                                   "cudaGraphLaunch")
        timer = EventTimer(cudart, stream.ptr)
        warm_ms, duration_s = float(o.get("warmUp", 200)), float(o.get("duration", 3))
        min_iters = int(o.get("iterations", 10))
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < warm_ms:
            launch()
            stream.synchronize()
        enqueue_ms = []
        t0 = time.perf_counter()
        while len(enqueue_ms) < min_iters or time.perf_counter() - t0 < duration_s:
            e0 = time.perf_counter()
            timer.time(launch)
            enqueue_ms.append((time.perf_counter() - e0) * 1e3)
            if len(enqueue_ms) % 64 == 0:
                stream.synchronize()  # keep the host at most 64 launches ahead, as trtexec's queue does
        stream.synchronize()
        walltime = time.perf_counter() - t0
        gpu_ms = timer.elapsed_ms()
        percentiles = [float(p) for p in o.get("percentile", "90,95,99").split(",")]
        self.log("[I] === Performance summary ===")
        self.log(f"[I] Throughput: {len(gpu_ms) / walltime:g} qps")
        self.log(stats_line("Latency", gpu_ms, percentiles))
        self.log(stats_line("Enqueue Time", np.asarray(enqueue_ms), percentiles))
        self.log(stats_line("GPU Compute Time", gpu_ms, percentiles))
        self.log(f"[I] Total Host Walltime: {walltime:g} s")
        self.log(f"[I] Total GPU Compute Time: {gpu_ms.sum() / 1e3:g} s")
        if transfers:
            self.log("[I] Note: with data transfers, Latency and GPU Compute Time both include the copies")
        self.profile_layers(context, stream)
        if graph_exec is not None:
            cudart.cudaGraphExecDestroy(graph_exec)
        timer.free()
        for b in buffers.values():
            b.free()
        stream.free()

    # --- per-layer profile and layer info (trtexec --separateProfileRun --exportProfile --exportLayerInfo) ------
    def _profiling_verbosity(self, config):
        name = self.opts.get("profilingVerbosity")
        if name is None:
            return
        levels = {"layer_names_only": "LAYER_NAMES_ONLY", "detailed": "DETAILED", "none": "NONE"}
        if name not in levels:
            raise UserError(f"trtexec_py: --profilingVerbosity={name}; use one of {', '.join(levels)}")
        config.profiling_verbosity = getattr(self.trt.ProfilingVerbosity, levels[name])

    def layer_info(self, engine, context):
        """--dumpLayerInfo / --exportLayerInfo: the engine inspector's layers, for the shapes set on `context`."""
        trt, o = self.trt, self.opts
        if not (o.get("dumpLayerInfo") or "exportLayerInfo" in o):
            return
        inspector = engine.create_engine_inspector()
        inspector.execution_context = context
        if o.get("dumpLayerInfo"):
            self.log("[I] Layer Information:\n" + inspector.get_engine_information(trt.LayerInformationFormat.ONELINE))
        if "exportLayerInfo" in o:
            with atomic_path(o["exportLayerInfo"]) as tmp:
                tmp.write_text(inspector.get_engine_information(trt.LayerInformationFormat.JSON), encoding="utf-8")
            self.log(f"[I] Layer information written to {o['exportLayerInfo']}")

    def profile_layers(self, context, stream):
        """--dumpProfile / --exportProfile: per-layer times from runs of their own after the timing runs (trtexec's
        --separateProfileRun, which the fallback always does: an attached profiler synchronises after every layer,
        so the timing runs must not have one). Same warm-up, duration and iteration count as the timing runs."""
        o = self.opts
        if not (o.get("dumpProfile") or "exportProfile" in o):
            return
        profiler = layer_profiler(self.trt)
        context.profiler = profiler
        context.enqueue_emits_profile = False  # report once per run, after the stream has finished it

        def run():
            profiler.runs.append({})
            if not context.execute_async_v3(stream.ptr):
                raise UserError("trtexec_py: execute_async_v3 failed in the profiling run")
            stream.synchronize()
            context.report_to_profiler()

        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < float(o.get("warmUp", 200)):
            run()
        profiler.runs.clear()
        t0 = time.perf_counter()
        min_runs, duration_s = int(o.get("iterations", 10)), float(o.get("duration", 3))
        while len(profiler.runs) < min_runs or time.perf_counter() - t0 < duration_s:
            run()
        records = profile_records(profiler.runs)
        if o.get("dumpProfile"):
            self.log(profile_text(records))
        if "exportProfile" in o:
            with atomic_path(o["exportProfile"]) as tmp:
                tmp.write_text(json.dumps(records, indent=1) + "\n")
            self.log(f"[I] Profile written to {o['exportProfile']}")


def tactic_mask(trt, mask: int, spec: str) -> int:
    """trtexec's --tacticSources=-CUBLAS,+CUDNN,...: the builder's tactic-source bit mask with those turned off (-) or
    on (+)."""
    for item in spec.split(","):
        name = item.lstrip("+-").upper()
        source = getattr(trt.TacticSource, name, None)
        if not item[:1] in ("+", "-") or source is None:
            raise UserError(f"trtexec_py: --tacticSources item {item!r}; write +NAME or -NAME with NAME one of "
                            f"{', '.join(n for n in dir(trt.TacticSource) if n.isupper())}")
        bit = 1 << int(source)
        mask = mask & ~bit if item[0] == "-" else mask | bit
    return mask


def random_input(shape, dtype: np.dtype) -> np.ndarray:
    """Inputs in the range the engine takes: [0, 1) floats, or pixels 0..255 for an end-to-end engine's uint8."""
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 256, shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def check(status: int, what: str):
    if status != 0:
        raise UserError(f"trtexec_py: CUDA error {status} in {what}")


def gpu_free_bytes(cudart) -> int:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    check(cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
    return free.value


def capture_graph(cudart, stream: int, enqueue) -> ctypes.c_void_p:
    graph, graph_exec = ctypes.c_void_p(), ctypes.c_void_p()
    check(cudart.cudaStreamBeginCapture(ctypes.c_void_p(stream), 2), "cudaStreamBeginCapture")  # 2 = relaxed
    enqueue()
    check(cudart.cudaStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(graph)), "cudaStreamEndCapture")
    check(cudart.cudaGraphInstantiate(ctypes.byref(graph_exec), graph, ctypes.c_ulonglong(0)), "cudaGraphInstantiate")
    cudart.cudaGraphDestroy(graph)
    return graph_exec


class EventTimer:
    """GPU time of each launch from a pair of CUDA events recorded around it on the stream."""

    def __init__(self, cudart, stream: int):
        self.cudart, self.stream, self.pairs = cudart, ctypes.c_void_p(stream), []

    def _event(self):
        ev = ctypes.c_void_p()
        check(self.cudart.cudaEventCreate(ctypes.byref(ev)), "cudaEventCreate")
        return ev

    def time(self, launch):
        start, end = self._event(), self._event()
        check(self.cudart.cudaEventRecord(start, self.stream), "cudaEventRecord")
        launch()
        check(self.cudart.cudaEventRecord(end, self.stream), "cudaEventRecord")
        self.pairs.append((start, end))

    def elapsed_ms(self) -> np.ndarray:
        out = np.empty(len(self.pairs))
        ms = ctypes.c_float()
        for i, (start, end) in enumerate(self.pairs):
            check(self.cudart.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime")
            out[i] = ms.value
        return out

    def free(self):
        for start, end in self.pairs:
            self.cudart.cudaEventDestroy(start)
            self.cudart.cudaEventDestroy(end)
        self.pairs = []


def cache_calibrator(trt, cache: bytes):
    """A calibrator that only replays a calibration cache (as trtexec --calib does); its algorithm follows the
    cache's header, since TensorRT ignores a cache written by another algorithm."""
    header = cache.split(b"\n", 1)[0]
    base = trt.IInt8MinMaxCalibrator if b"MinMax" in header else trt.IInt8EntropyCalibrator2

    class CacheCalibrator(base):
        def __init__(self):
            base.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            return None

    return CacheCalibrator()


def sink_logger(trt):
    """A TensorRT logger whose messages go to `.sink`: the current request's log, set per build by the server."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.sink = print

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.sink(f"[TRT] {msg}")

    return Logger()


def save_engine(opts: dict, plan: bytes) -> None:
    """--saveEngine: the whole plan or nothing (written beside the target, then renamed onto it)."""
    if "saveEngine" in opts:
        with atomic_path(opts["saveEngine"]) as tmp:
            tmp.write_bytes(plan)


class BuildServer:
    """Answers build requests one at a time with `build(opts, out) -> engine bytes`, which keeps whatever it likes
    (TensorRT's builder, timing caches) from one build to the next."""

    def __init__(self, build, name: str):
        self.build, self.name, self.builds = build, name, 0

    def handle(self, argv: list[str]) -> tuple[int, list[str]]:
        lines = [f"[I] trtexec_py build server ({self.name}): build {self.builds + 1} of this process, builder and "
                 f"timing caches kept from the earlier ones"]
        rc = 0
        try:
            opts = parse_flags(argv)
            if "onnx" not in opts:
                raise UserError("trtexec_py build server: only builds (--onnx=...) are served")
            save_engine(opts, self.build(opts, lines.append))
        except UserError as e:
            lines.append(f"error: {e}")
            rc = 2
        except Exception as e:  # noqa: BLE001 - the client reports it; the server serves the next build
            lines.append(f"error: trtexec_py build server: {type(e).__name__}: {e}")
            rc = 1
        self.builds += 1
        return rc, lines

    def serve(self, address: str) -> None:
        print(f"trtexec_py build server on {address} ({self.name})", flush=True)
        with Listener(address, family="AF_UNIX") as listener:
            while True:
                with listener.accept() as conn:
                    try:
                        argv = conn.recv()
                    except EOFError:  # a client that only looked whether a server listens (server_listening)
                        continue
                    if argv is None:
                        return
                    conn.send(self.handle(argv))


def tensorrt_build_server() -> BuildServer:
    """The real server: one TensorRT builder and one in-memory timing cache per builder level for every build.
    TensorRT 8.6 refuses a timing cache file written by another process once Myelin graphs are in it, but within
    one process the cache holds: on an H200 (TensorRT 8.6, level 1) a second build of the same Q/DQ graph took 12 s
    instead of 120 s. A sweep starts one server per GPU and points that GPU's builds at it (TRTEXEC_PY_SERVER)."""
    trt = import_tensorrt("the trtexec_py build server")

    logger = sink_logger(trt)
    kept = {"caches": {}}  # the builder is made at the first build, so the socket answers from the start

    def build(opts, out):
        logger.sink = out
        if "builder" not in kept:
            kept["builder"] = trt.Builder(logger)
        return Fallback(opts, kept["builder"], kept["caches"], out, logger).build()

    return BuildServer(build, f"pid {os.getpid()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '0')}")


def stop_server(address: str) -> None:
    with Client(address, family="AF_UNIX") as conn:
        conn.send(None)


def server_listening(address: str) -> bool:
    """Whether a build server answers at `address` (a socket file left by a server that died answers nothing)."""
    try:
        Client(address, family="AF_UNIX").close()
    except OSError:
        return False
    return True


def build_on_server(address: str, argv: list[str]) -> int | None:
    """Send a build to the server at `address`; its exit code, or None when no server answers (build here)."""
    try:
        conn = Client(address, family="AF_UNIX")
    except OSError:
        print(f"[I] no build server at {address}: building in this process", flush=True)
        return None
    with conn:
        conn.send(argv)
        rc, lines = conn.recv()
    for line in lines:
        print(line, flush=True)
    return rc


# ----------------------------------------------------------------------------------------------------------------
# Per-layer profiling: trtexec's flags for it, and its export format (read back by tools/yolo/layers.py)
FLAGS_WITH_VALUE |= {"exportProfile", "exportLayerInfo", "profilingVerbosity"}
SWITCHES |= {"dumpProfile", "dumpLayerInfo", "separateProfileRun"}


def check_profiling_flags(opts: dict):
    wanted = [f"--{k}" for k in ("dumpProfile", "exportProfile", "dumpLayerInfo", "exportLayerInfo") if k in opts]
    if wanted and opts.get("skipInference"):
        raise UserError(f"trtexec_py: {' '.join(wanted)} needs an inference run; drop --skipInference (the fallback "
                        f"profiles and inspects engines when it runs them)")


def layer_profiler(trt):
    """A trt.IProfiler that keeps one {layer name: ms} dict per profiled run (the caller opens each run's dict)."""
    class LayerTimes(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.runs: list[dict[str, float]] = []

        def report_layer_time(self, layer_name, ms):
            run = self.runs[-1]
            run[layer_name] = run.get(layer_name, 0.0) + ms

    return LayerTimes()


def profile_records(runs: list[dict[str, float]]) -> list[dict]:
    """Per-run layer times -> trtexec's --exportProfile JSON: [{"count": runs}, {"name", "timeMs" (all runs),
    "averageMs", "medianMs", "percentage"}, ...], layers in the order they ran."""
    if not runs:
        raise UserError("trtexec_py: the profiling run recorded nothing; raise --iterations or --duration")
    names = list(dict.fromkeys(name for run in runs for name in run))
    per_layer = {name: np.array([run.get(name, 0.0) for run in runs]) for name in names}
    total = sum(v.sum() for v in per_layer.values())
    return [{"count": len(runs)}] + [
        {"name": name, "timeMs": float(v.sum()), "averageMs": float(v.mean()), "medianMs": float(np.median(v)),
         "percentage": float(100 * v.sum() / total) if total else 0.0} for name, v in per_layer.items()]


def profile_text(records: list[dict]) -> str:
    """trtexec's --dumpProfile table."""
    layers = records[1:]
    lines = [f"[I] === Profile ({records[0]['count']} iterations ) ===",
             f"[I] {'Time(ms)':>11} {'Avg.(ms)':>11} {'Median(ms)':>11} {'Time(%)':>8}   Layer"]
    lines += [f"[I] {r['timeMs']:11.2f} {r['averageMs']:11.4f} {r['medianMs']:11.4f} {r['percentage']:8.1f}   "
              f"{r['name']}" for r in layers]
    total = sum(r["timeMs"] for r in layers)
    lines.append(f"[I] {total:11.2f} {total / records[0]['count']:11.4f} "
                 f"{sum(r['medianMs'] for r in layers):11.4f} {100.0:8.1f}   Total")
    return "\n".join(lines)


def usage() -> str:
    return (__doc__ + "\nUsage: python -m tools.trtexec_py --onnx=M.onnx [--saveEngine=E] ... | --loadEngine=E ...\n"
            "Flags with a value (as --name=value): " + ", ".join(sorted(FLAGS_WITH_VALUE)) + "\n"
            "Switches: " + ", ".join(sorted(SWITCHES)) + "\n"
            "Fallback only: --serve SOCKET runs a build server (one per GPU); builds whose environment has\n"
            "TRTEXEC_PY_SERVER=SOCKET go to it and share its builder and in-memory timing caches.\n"
            "--stop SOCKET ends the server there (one a sweep left running:\n"
            "make sweep SWEEP_ARGS='--build-servers DIR').\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return
    if argv[0] == "--serve":
        if len(argv) != 2:
            raise UserError("trtexec_py: --serve takes one socket path: python -m tools.trtexec_py --serve /tmp/s.sock")
        tensorrt_build_server().serve(argv[1])
        return
    if argv[0] == "--stop":
        if len(argv) != 2 or not server_listening(argv[1]):
            raise UserError(f"trtexec_py: no build server answers at {' '.join(argv[1:]) or '(no socket given)'}: "
                            f"--stop takes the socket a server listens on, e.g. /tmp/trt-servers/gpu0.sock")
        stop_server(argv[1])
        print(f"stopped the build server at {argv[1]}")
        return
    opts = parse_flags(argv)
    trt = import_tensorrt("python -m tools.trtexec_py")

    print(f"&&&& RUNNING trtexec_py (this repo's fallback for trtexec, TensorRT Python API) [TensorRT v{trt.__version__}]"
          f" # python -m tools.trtexec_py {' '.join(argv)}", flush=True)
    server = os.environ.get("TRTEXEC_PY_SERVER")
    rc = build_on_server(server, argv) if server and "onnx" in opts and opts.get("skipInference") else None
    if rc:
        sys.exit(rc)
    if rc is None:  # no server took the build: this process does the work
        fb = Fallback(opts)
        if "onnx" in opts:
            plan = fb.build()
            save_engine(opts, plan)
        else:
            path = Path(opts["loadEngine"])
            if not path.is_file():
                raise UserError(f"{path}: no such engine; build it first (make engine)")
            plan = engine_bytes(path)  # an ultralytics copy's header skipped
        if not opts.get("skipInference"):
            fb.infer(plan)
    print(f"&&&& PASSED trtexec_py # python -m tools.trtexec_py {' '.join(argv)}", flush=True)


if __name__ == "__main__":
    run_main(main)
