"""End-to-end timing of deployed engines: the whole frame, not GPU compute alone.

For each recipe's engines (one per deployment profile, built by the pipeline's engine stage) at their batch:
- stages, one batch at a time on one stream, in ms per batch (p50 / p99 over the runs): `letterbox` (CPU: resize
  and pad the decoded frames, uint8), `normalise` (CPU: RGB, CHW, /255 to float32; none for an engine that takes
  uint8 and does it inside), `h2d` (pinned host -> device), `infer` (execute_async_v3), `d2h`, `nms` (CPU:
  ultralytics' NMS as tools.evaluate scores it; for an engine with NMS inside, reading its num_dets rows). GPU
  stages from CUDA events, CPU stages from the host clock; `total` is the wall time of the whole iteration.
  `nms_deploy`: the CPU NMS again at a deployment's conf 0.25 (not part of `total`).
- `loop_ips`: images/s of the whole loop with copies overlapped: `streams` threads, each with its own execution
  context, CUDA stream and pinned buffers, doing letterbox, normalise, copies, inference and NMS (OpenCV and numpy
  release the GIL, so one thread's CPU work overlaps another's GPU work).
- `resident_ips`: the same loop on frames already preprocessed in pinned memory (copies, inference, NMS outputs read
  back; no CPU NMS): what the engine and its copies allow when the host keeps up.
JPEG decoding is left out (frames are decoded once before timing): a camera or video decoder hands over frames.
NMS thresholds are the evaluation's (conf 0.001, IoU 0.7, 300) unless given; an engine with NMS inside uses the
thresholds it was built with (the record's recipe says which).
Usage: python -m tools.e2e RECIPE... [--eval-dir DIR] [--results DIR] [--streams 2]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from polygraphy import cuda

from tools.core.cli import add_model, positive_int, positive_number
from tools.core.errors import UserError, import_tensorrt, run_main
from tools.core.files import list_images, write_json
from tools.core.recipe import load
from tools.core.record import now_utc
from tools.core.setup import add_setup_args, setup_from_args
from tools.deploy_graph import NMS_OUTPUTS, decode_nms
from tools.pipeline import Point
from tools.ultralytics_engine import engine_bytes
from tools.yolo.decode import postprocess
from tools.yolo.preprocess import letterbox, load_resized, read_image

STAGES = ("letterbox", "normalise", "h2d", "infer", "d2h", "nms")
H2D, D2H = 1, 2  # cudaMemcpyKind


@dataclass(frozen=True)
class Thresholds:
    conf: float = 0.001
    iou: float = 0.7
    max_det: int = 300


# what a deployment keeps (ultralytics predict's defaults): the CPU NMS is also timed at these, beside the
# evaluation's thresholds that the whole run uses (the end-to-end engines are built with those, to be scored)
DEPLOY = Thresholds(conf=0.25)


# ----------------------------------------------------------------------------------------------------------------
# Host side: what the CPU does for each kind of engine input and output (no GPU needed; tested on the CPU)
def letterbox_frame(frame: np.ndarray, imgsz: int) -> np.ndarray:
    """A decoded BGR frame -> the letterboxed uint8 HWC BGR canvas, exactly as tools.yolo.preprocess makes it."""
    canvas, _ = letterbox(load_resized(frame, imgsz), imgsz)
    return canvas


def engine_input(canvases: list[np.ndarray], dtype: np.dtype, nhwc: bool, out: np.ndarray) -> None:
    """Letterboxed BGR canvases -> the engine's input, written into `out` (pinned memory): float input gets RGB, CHW,
    /255 (the `normalise` stage); uint8 input only RGB in its layout (the engine normalises)."""
    for i, c in enumerate(canvases):
        rgb = c[:, :, ::-1]
        if dtype == np.uint8:
            out[i] = rgb if nhwc else rgb.transpose(2, 0, 1)
        else:
            np.divide(rgb.transpose(2, 0, 1), np.float32(255), out=out[i], casting="unsafe")


def raw_detections(raw: np.ndarray, t: Thresholds) -> list[np.ndarray]:
    """The raw head [N, 4 + classes, anchors] -> per image detections, as tools.evaluate.predict decodes them."""
    live = raw[:, 4:].max(axis=1) > t.conf
    return [postprocess(raw[i][:, live[i]], t.conf, t.iou, t.max_det) for i in range(len(raw))]


def summarise(samples: dict[str, list[float]], batch: int) -> dict:
    """Stage samples (ms per batch) -> p50 / p99 per stage, and per image at p50."""
    row = {}
    for stage, values in samples.items():
        v = np.asarray(values, dtype=np.float64)
        row[f"{stage}_p50"] = round(float(np.median(v)), 4) if v.size else None
        row[f"{stage}_p99"] = round(float(np.percentile(v, 99)), 4) if v.size else None
    row["ms_per_image"] = round(row["total_p50"] / batch, 4)
    return row


def speedups(rows: list[dict]) -> list[dict]:
    """For each INT8 row, FP16's over INT8's total p50 and loop images/s ratio of the FP16 row of the same profile and
    engine kind (raw or end to end), measured in the same run."""
    fp16 = {(r["profile"], r["kind"]): r for r in rows if r["precision"] == "fp16"}
    out = []
    for r in rows:
        ref = fp16.get((r["profile"], r["kind"]))
        if r["precision"] == "fp16" or ref is None:
            continue
        out.append({"name": r["name"], "profile": r["profile"], "kind": r["kind"], "versus": ref["name"],
                    "total_speedup": round(ref["total_p50"] / r["total_p50"], 3),
                    "infer_speedup": round(ref["infer_p50"] / r["infer_p50"], 3),
                    "loop_speedup": round(r["loop_ips"] / ref["loop_ips"], 3),
                    "resident_speedup": round(r["resident_ips"] / ref["resident_ips"], 3)})
    return out


def markdown(result: dict) -> str:
    def f(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    def score(v):
        return "-" if v is None else f"{v:.4f}"

    env = result["environment"]
    lines = [f"# End to end: {result['model']}", "",
             f"{env['gpu']}, TensorRT {env['trt_version']}, {env['host_cpus']} host CPUs, {result['utc']}. "
             f"Builder level and profile per row; frames: {result['frames']} decoded images of {result['images']}, "
             f"letterboxed to {result['imgsz']} each run; NMS conf {result['thresholds']['conf']}, IoU "
             f"{result['thresholds']['iou']}, {result['thresholds']['max_det']} boxes. ms per batch, p50 (p99); "
             f"loop: {result['streams']} threads/streams, copies overlapped, pinned memory.", "",
             "| engine | kind | profile | level | letterbox | normalise | h2d | infer | d2h | nms | total | "
             f"ms/image | loop img/s | resident img/s | nms at conf {DEPLOY.conf} | mAP50-95 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [f"{f(r[f'{s}_p50'])} ({f(r[f'{s}_p99'])})" if r[f"{s}_p50"] is not None else "-"
                 for s in (*STAGES, "total")]
        lines.append(f"| {r['name']} | {r['kind']} | {r['profile']} | {r['level']} | " + " | ".join(cells) +
                     f" | {f(r['ms_per_image'])} | {r['loop_ips']:,.0f} | {r['resident_ips']:,.0f} | "
                     f"{f(r['nms_deploy_p50'])} | {score(r['map50_95'])} |")
    if result["speedups"]:
        lines += ["", "INT8 against FP16 of the same kind and profile, this run:", "",
                  "| engine | kind | profile | total (one batch) | inference alone | whole loop | resident loop |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['name']} | {s['kind']} | {s['profile']} | {s['total_speedup']:.2f}x | "
                  f"{s['infer_speedup']:.2f}x | {s['loop_speedup']:.2f}x | {s['resident_speedup']:.2f}x |"
                  for s in result["speedups"]]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    keys = list(rows[0])
    return "\n".join([",".join(keys)] + [",".join("" if r[k] is None else str(r[k]) for k in keys)
                                         for r in rows]) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# GPU side
class Cuda:
    """The few CUDA runtime calls the loops need (ctypes on the runtime Polygraphy finds): no torch, no cuda-python."""

    def __init__(self):
        self.rt = cuda.wrapper().handle

    def check(self, status, what):
        if status != 0:
            raise UserError(f"e2e: CUDA error {status} in {what}")

    def pinned(self, shape, dtype) -> np.ndarray:
        """Page-locked host memory as a numpy array (asynchronous copies need it)."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = ctypes.c_void_p()
        self.check(self.rt.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), 0), "cudaHostAlloc")
        buf = (ctypes.c_uint8 * nbytes).from_address(ptr.value)
        arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
        self._owned = getattr(self, "_owned", []) + [ptr]
        return arr

    def device(self, nbytes) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")
        self._device = getattr(self, "_device", []) + [ptr]
        return ptr.value

    def stream(self) -> ctypes.c_void_p:
        s = ctypes.c_void_p()
        self.check(self.rt.cudaStreamCreateWithFlags(ctypes.byref(s), 1), "cudaStreamCreate")  # 1: non-blocking
        return s

    def copy(self, dst, src, nbytes, kind, stream):
        self.check(self.rt.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                           kind, stream), "cudaMemcpyAsync")

    def event(self):
        e = ctypes.c_void_p()
        self.check(self.rt.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        return e

    def record(self, event, stream):
        self.check(self.rt.cudaEventRecord(event, stream), "cudaEventRecord")

    def elapsed(self, start, end) -> float:
        ms = ctypes.c_float()
        self.check(self.rt.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime")
        return ms.value

    def sync(self, stream):
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def free(self):
        for p in getattr(self, "_owned", []):
            self.rt.cudaFreeHost(p)
        for p in getattr(self, "_device", []):
            self.rt.cudaFree(p)
        self._owned, self._device = [], []


class Lane:
    """One engine instance with its execution context, stream and buffers, at one batch: a worker of the loop. Each
    lane deserializes the engine again, as trtexec --streams does: an optimization profile (every engine of ours has
    one) serves one execution context at a time."""

    def __init__(self, plan: bytes, runtime, trt, cuda: Cuda, batch: int, source):
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise UserError(f"{source}: TensorRT {trt.__version__} cannot load it; rebuild it with make engine")
        self.engine, self.cuda, self.context = engine, cuda, engine.create_execution_context()
        self.stream = cuda.stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1:
            raise UserError(f"e2e: the engine has inputs {self.inputs}; a YOLO engine takes one image batch")
        name = self.inputs[0]
        shape = list(engine.get_tensor_shape(name))
        shape[0] = batch
        self.context.set_input_shape(name, tuple(shape))
        self.host, self.dev = {}, {}
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            self.host[n] = cuda.pinned(shape, dtype)
            self.dev[n] = cuda.device(self.host[n].nbytes)
            self.context.set_tensor_address(n, self.dev[n])
        self.input = self.host[name]
        self.nhwc = self.input.shape[-1] == 3
        self.nms_inside = set(NMS_OUTPUTS) <= set(self.outputs)

    def h2d(self):
        for n in self.inputs:
            self.cuda.copy(self.dev[n], self.host[n].ctypes.data, self.host[n].nbytes, H2D, self.stream)

    def infer(self):
        if not self.context.execute_async_v3(self.stream.value):
            raise UserError("e2e: execute_async_v3 failed")

    def d2h(self):
        for n in self.outputs:
            self.cuda.copy(self.host[n].ctypes.data, self.dev[n], self.host[n].nbytes, D2H, self.stream)

    def detections(self, t: Thresholds) -> list[np.ndarray]:
        if self.nms_inside:
            return decode_nms(*(self.host[n] for n in NMS_OUTPUTS))
        return raw_detections(self.host[self.outputs[0]], t)


def time_stages(lane: Lane, frames, batch: int, imgsz: int, t: Thresholds, warmup_s: float, duration_s: float,
                min_runs: int = 10) -> dict[str, list[float]]:
    cuda = lane.cuda
    events = [cuda.event() for _ in range(4)]
    samples = {s: [] for s in (*STAGES, "total", "nms_deploy")}
    start = time.perf_counter()
    runs, i = 0, 0
    while True:
        measuring = time.perf_counter() - start >= warmup_s
        chunk = [frames[(i + k) % len(frames)] for k in range(batch)]
        i += batch
        t0 = time.perf_counter()
        canvases = [letterbox_frame(f, imgsz) for f in chunk]
        t1 = time.perf_counter()
        engine_input(canvases, lane.input.dtype, lane.nhwc, lane.input)
        t2 = time.perf_counter()
        cuda.record(events[0], lane.stream)
        lane.h2d()
        cuda.record(events[1], lane.stream)
        lane.infer()
        cuda.record(events[2], lane.stream)
        lane.d2h()
        cuda.record(events[3], lane.stream)
        cuda.sync(lane.stream)
        t3 = time.perf_counter()
        lane.detections(t)
        t4 = time.perf_counter()
        if not lane.nms_inside:
            lane.detections(DEPLOY)
        t5 = time.perf_counter()
        if not measuring:
            continue
        samples["letterbox"].append((t1 - t0) * 1e3)
        if lane.input.dtype != np.uint8:
            samples["normalise"].append((t2 - t1) * 1e3)
        samples["h2d"].append(cuda.elapsed(events[0], events[1]))
        samples["infer"].append(cuda.elapsed(events[1], events[2]))
        samples["d2h"].append(cuda.elapsed(events[2], events[3]))
        samples["nms"].append((t4 - t3) * 1e3)
        samples["total"].append((t4 - t0) * 1e3)
        if not lane.nms_inside:
            samples["nms_deploy"].append((t5 - t4) * 1e3)
        runs += 1
        if runs >= min_runs and time.perf_counter() - start >= warmup_s + duration_s:
            return samples


def loop_ips(lanes: list[Lane], frames, batch: int, imgsz: int, t: Thresholds, warmup_s: float, duration_s: float,
             resident: bool) -> float:
    """Images/s of `lanes` running side by side (one thread each) for duration_s after warmup_s."""
    if resident:  # preprocess once: the loop then measures copies, inference and reading the outputs back
        for lane in lanes:
            engine_input([letterbox_frame(frames[k % len(frames)], imgsz) for k in range(batch)], lane.input.dtype,
                         lane.nhwc, lane.input)
    counts = [0] * len(lanes)
    begin, stop = threading.Event(), threading.Event()
    errors = []

    def work(n: int, lane: Lane):
        i = n * batch
        try:
            while not stop.is_set():
                if not resident:
                    chunk = [frames[(i + k) % len(frames)] for k in range(batch)]
                    engine_input([letterbox_frame(f, imgsz) for f in chunk], lane.input.dtype, lane.nhwc, lane.input)
                    i += batch * len(lanes)
                lane.h2d()
                lane.infer()
                lane.d2h()
                lane.cuda.sync(lane.stream)
                if not resident or lane.nms_inside:
                    lane.detections(t)
                if begin.is_set():
                    counts[n] += batch
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=work, args=(n, lane), daemon=True) for n, lane in enumerate(lanes)]
    for th in threads:
        th.start()
    time.sleep(warmup_s)
    begin.set()
    t0 = time.perf_counter()
    time.sleep(duration_s)
    done = sum(counts)
    elapsed = time.perf_counter() - t0
    stop.set()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return done / elapsed


def measure_engine(engine_path, batch: int, frames, imgsz: int, t: Thresholds, streams: int, warmup_s: float,
                   duration_s: float) -> dict:
    """Every measurement of one engine at one batch, in one process."""
    trt = import_tensorrt(f"timing {engine_path} end to end")
    logger = trt.Logger(trt.Logger.ERROR)
    trt.init_libnvinfer_plugins(logger, "")  # an end-to-end engine holds EfficientNMS_TRT
    runtime, plan = trt.Runtime(logger), engine_bytes(engine_path)
    cuda, lanes = Cuda(), []
    try:
        lanes += [Lane(plan, runtime, trt, cuda, batch, engine_path) for _ in range(streams)]
        samples = time_stages(lanes[0], frames, batch, imgsz, t, warmup_s, duration_s)
        row = summarise(samples, batch)
        row["loop_ips"] = round(loop_ips(lanes, frames, batch, imgsz, t, warmup_s, duration_s, False), 1)
        row["resident_ips"] = round(loop_ips(lanes, frames, batch, imgsz, t, warmup_s, duration_s, True), 1)
        row.update(input=f"{lanes[0].input.dtype}{'-nhwc' if lanes[0].nhwc else '-nchw'}",
                   nms="engine" if lanes[0].nms_inside else "cpu")
        return row
    finally:
        lanes.clear()  # the contexts go before the memory they point at
        cuda.free()


def decoded_frames(eval_dir, count: int) -> tuple[list[np.ndarray], int]:
    files = list_images(eval_dir)
    return [read_image(p) for p in files[:count]], len(files)


def measure(recipes, setup, frames_count: int = 64, streams: int = 2, warmup_s: float = 0.5,
            duration_s: float = 2.0, thresholds: Thresholds = Thresholds()) -> dict:
    """Every deployment profile of every recipe, measured end to end in one run (engines must be built)."""
    import_tensorrt("end-to-end timing (make e2e)")
    frames, images = decoded_frames(setup.eval_dir, frames_count)
    rows, env = [], None
    for recipe in recipes:
        recipe = setup.adapt(recipe)
        for profile in setup.engine_profiles(recipe):
            point = Point(recipe, setup, profile)
            rec = point.record.data
            if "build" not in rec or not point.engine_path.is_file():
                raise UserError(f"recipe {recipe.name!r} [{profile}]: no engine yet; run `make engine "
                                f"RECIPE=<its file>` (or make e2e, which builds them) first")
            p = recipe.profiles[profile]
            if not p.static:
                raise UserError(f"recipe {recipe.name!r} [{profile}]: a dynamic profile; end-to-end timing takes "
                                f"static engines ({{batch: N}}), one batch each")
            env = env or {"gpu": rec["gpu"], "trt_version": rec["trt_version"], "host_cpus": os.cpu_count(),
                          "host": platform.node()}
            nms = recipe.deploy.nms if recipe.deploy else None
            t = Thresholds(nms.conf, nms.iou, nms.max_det) if nms else thresholds
            print(f"  {recipe.name} [{profile}]: timing end to end at batch {p.max}", flush=True)
            row = measure_engine(point.engine_path, p.max, frames, recipe.imgsz, t, streams, warmup_s, duration_s)
            rows.append({"name": recipe.name, "precision": recipe.precision, "profile": profile, "batch": p.max,
                         "level": recipe.builder_optimization_level,
                         "kind": "end-to-end" if recipe.deploy else "raw",
                         "engine_key": rec["engine_key"], "conf": t.conf, "iou": t.iou, "max_det": t.max_det,
                         # the engine's COCO mAP where the accuracy stage scored it on this evaluation set
                         "map50_95": rec.get("accuracy", {}).get("map50_95"), **row})
    if not rows:
        raise UserError("e2e: no engine to time; pass recipes with deployment profiles")
    return {"model": recipes[0].model, "utc": now_utc(), "environment": env, "imgsz": recipes[0].imgsz,
            "frames": len(frames), "images": images, "streams": streams, "warmup_s": warmup_s,
            "duration_s": duration_s, "thresholds": vars(thresholds), "rows": rows, "speedups": speedups(rows)}


def write(result: dict, layout) -> list[Path]:
    out = [layout.e2e(ext) for ext in ("json", "csv", "md")]
    for path in out:
        layout.guard(path)
    write_json(out[0], result)
    layout.write_text(out[1], to_csv(result["rows"]))
    layout.write_text(out[2], markdown(result))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="recipes whose engines to time (FP16 and INT8, raw and end to end)")
    add_model(ap)
    add_setup_args(ap)
    ap.add_argument("--streams", type=positive_int, default=2, help="threads/streams of the whole loop (default 2)")
    ap.add_argument("--frames", type=positive_int, default=64, help="decoded frames to cycle through (default 64)")
    ap.add_argument("--conf", type=positive_number, default=Thresholds.conf, help="CPU NMS score threshold")
    ap.add_argument("--iou", type=positive_number, default=Thresholds.iou, help="CPU NMS IoU threshold")
    ap.add_argument("--max-det", type=positive_int, default=Thresholds.max_det, help="CPU NMS boxes per image")
    args = ap.parse_args(argv)
    setup = setup_from_args(args)
    recipes = [load(p, args.model) for p in args.recipes]
    result = measure(recipes, setup, args.frames, args.streams, args.warmup_ms / 1e3, args.duration,
                     Thresholds(args.conf, args.iou, args.max_det))
    for path in write(result, setup.layout(recipes[0].model)):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
