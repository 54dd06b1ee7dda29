"""COCO mAP50-95 / mAP50 of an ONNX model (ONNX Runtime) or a TensorRT engine on a folder of COCO images.

Decoding and NMS follow ultralytics' validation (conf 0.001, IoU 0.7, 300 detections, multi-label, square 640
letterbox); an end-to-end engine with NMS inside (tools/deploy_graph.py) returns its own detections, which are scaled
and scored the same way. faster-coco-eval scores the detections: the C++ COCOeval that ultralytics 8.4 uses, with
pycocotools' numbers at a fraction of its time (a sweep scores every configuration on 900 images). The images whose
ids are listed in `exact_ids.txt` (official annotations) are also scored on their own.
Usage: python -m tools.evaluate models/yolo11/yolo11n.onnx --images DIR [--annotations DIR/annotations.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from faster_coco_eval import COCO, COCOeval_faster
from polygraphy.backend.trt import TrtRunner
from tqdm import tqdm

from tools.core.cli import add_imgsz, positive_int
from tools.core.errors import UserError, import_tensorrt, run_main
from tools.core.files import list_images, write_json
from tools.deploy_graph import INPUT, NMS_OUTPUTS, PLUGIN, decode_nms, has_plugin
from tools.ultralytics_engine import engine_bytes
from tools.yolo.decode import COCO80_TO_91, postprocess, scale_boxes
from tools.yolo.preprocess import preprocess, to_input
from tools.yolo.qdq_fp16 import for_onnxruntime


# ----------------------------------------------------------------------------------------------------------------
# Backends: .detect(uint8 NCHW letterboxed batch, conf, iou, max_det) -> per image (k, 6) float32 [x1, y1, x2, y2,
# score, class] in letterbox pixels, whatever the model takes (float32 NCHW /255, or uint8 NCHW / NHWC: an end-to-end
# graph, tools/deploy_graph.py) and returns (the raw head [N, 4 + classes, anchors], or EfficientNMS_TRT's outputs)
class Backend:
    def read_io(self, input_dtype, input_shape, outputs) -> None:
        self.dtype = np.dtype(input_dtype)  # float32, float16 (an engine with input_io_format fp16:chw) or uint8
        self.uint8 = self.dtype == np.uint8
        self.nhwc = input_shape[-1] == 3 and input_shape[1] != 3
        self.outputs = list(outputs)
        self.nms = set(NMS_OUTPUTS) <= set(self.outputs)

    def feed(self, batch_u8: np.ndarray) -> np.ndarray:
        if not self.uint8:
            return to_input(batch_u8).astype(self.dtype, copy=False)
        return np.ascontiguousarray(batch_u8.transpose(0, 2, 3, 1)) if self.nhwc else batch_u8

    def infer(self, x) -> np.ndarray:
        """The raw head for the model's own input (float32 NCHW for a raw model)."""
        return self.run(x)[self.outputs[0]]

    def detect(self, batch_u8, conf=0.001, iou=0.7, max_det=300, imap=map) -> list[np.ndarray]:
        out = self.run(self.feed(batch_u8))
        if self.nms:  # NMS ran in the engine at its own thresholds: keep what passes these too
            return [d[d[:, 4] > conf][:max_det] for d in decode_nms(*(out[n] for n in NMS_OUTPUTS))]
        raw = out[self.outputs[0]]
        # only anchors with some class above `conf` can yield a detection: drop the rest here, vectorised, so the
        # NMS workers get a fraction of the 84 x 8400 floats per image (same detections, same order)
        live = raw[:, 4:].max(axis=1) > conf
        return list(imap(_nms, [(raw[i][:, live[i]], conf, iou, max_det) for i in range(len(raw))]))


def _nms(args):
    return postprocess(*args)


class OnnxrtBackend(Backend):
    def __init__(self, onnx_path, threads: int | None = None):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # onnxruntime-gpu lists CUDA even on machines without a GPU, then fails loudly: ask only where one exists
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if os.path.exists("/dev/nvidiactl") else \
            ("CPUExecutionProvider",)
        providers = [p for p in wanted if p in ort.get_available_providers()]
        model = onnxruntime_model(onnx_path)
        try:
            self.session = ort.InferenceSession(model, opts, providers=providers)
        except Exception as e:  # ORT raises its own InvalidGraph/Fail/NoSuchFile types
            raise UserError(f"{onnx_path}: ONNX Runtime cannot load it ({onnxruntime_reason(e)})") from None
        check_detector(onnx_path, self.session)
        self.input = self.session.get_inputs()[0]
        self.read_io(np.uint8 if self.input.type == "tensor(uint8)" else np.float32, self.input.shape,
                     [o.name for o in self.session.get_outputs()])
        self.name = f"onnxruntime {ort.__version__} ({self.session.get_providers()[0]})"

    def run(self, x) -> dict:
        return dict(zip(self.outputs, self.session.run(None, {self.input.name: x})))


def onnxruntime_reason(error: Exception) -> str:
    """The cause in one of ONNX Runtime's errors, without its source location and C++ signature."""
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "onnxruntime_src" in line:  # "... : FAIL : /onnxruntime_src/...cc:181 ns::Fn(args...) <the cause>"
        line = line.rsplit(") ", 1)[-1]
    return line[:200]


def onnxruntime_model(onnx_path) -> bytes | str:
    """What ONNX Runtime should load: the model itself, except that an FP16 Q/DQ flavour gets float32 QuantizeLinear
    where this ONNX Runtime truncates float16 ones (tools/yolo/qdq_fp16.py; its scores collapse otherwise)."""
    try:
        model = onnx.load(str(onnx_path))
    except Exception:  # noqa: BLE001 - ONNX Runtime names what is wrong with the file
        return str(onnx_path)
    if has_plugin(model):
        raise UserError(f"{onnx_path}: has NMS inside (TensorRT's {PLUGIN} plugin), which ONNX Runtime cannot run; "
                        f"build an engine from it (make engine) or use the model without deploy.nms")
    fixed = for_onnxruntime(model)
    return str(onnx_path) if fixed is model else fixed.SerializeToString()


def check_detector(onnx_path, session) -> None:
    """Any other model would fail deep in decoding, or be scored against the wrong classes."""
    (i, *_), (o, *_) = session.get_inputs(), session.get_outputs()
    rows = 4 + len(COCO80_TO_91)
    if len(i.shape) != 4 or len(o.shape) != 3 or (isinstance(o.shape[1], int) and o.shape[1] != rows):
        raise UserError(f"{onnx_path}: input {i.shape} / output {o.shape} is not a COCO YOLO detector's "
                        f"[N,3,H,W] -> [N,{rows},anchors]; pass a YOLO11 detection ONNX exported without NMS")


class TrtBackend(Backend):
    def __init__(self, engine_path):
        if not Path(engine_path).is_file():
            raise UserError(f"{engine_path}: no such engine; build it first (make engine)")
        trt = import_tensorrt(f"scoring {engine_path}")

        logger = trt.Logger(trt.Logger.ERROR)
        trt.init_libnvinfer_plugins(logger, "")  # an end-to-end engine holds EfficientNMS_TRT
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes(engine_path))
        if engine is None:
            raise UserError(f"{engine_path}: TensorRT {trt.__version__} cannot load it (another TensorRT version or "
                            f"GPU built it); rebuild it with make engine")
        shape = tuple(engine.get_tensor_shape(INPUT))
        self.static_batch = shape[0] if shape[0] > 0 else None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.read_io(trt.nptype(engine.get_tensor_dtype(INPUT)), shape,
                     [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT])
        self.runner = TrtRunner(engine)
        self.runner.activate()
        self.name = f"TensorRT {trt.__version__}"

    def run(self, x) -> dict:
        n = len(x)
        if self.static_batch and n < self.static_batch:  # a static engine takes its batch only: pad the last chunk
            x = np.concatenate([x, np.zeros((self.static_batch - n, *x.shape[1:]), x.dtype)])
        out = self.runner.infer({INPUT: x}, copy_outputs_to_host=True)
        # float16 outputs (output_io_format fp16:chw) widen exactly: the scores are those of what the engine returned
        return {name: widen(np.asarray(v)[:n]) for name, v in out.items()}

    def close(self):
        self.runner.deactivate()


def widen(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype == np.float16 else a


def make_backend(model):
    if not Path(model).is_file():
        raise UserError(f"{model}: no such model; pass a .onnx model or an engine built by make engine")
    suffix = Path(model).suffix
    if suffix == ".onnx":
        return OnnxrtBackend(model)
    if suffix in (".engine", ".plan", ".trt"):
        return TrtBackend(model)
    raise UserError(f"{model}: expected a .onnx model or an .engine file")


# ----------------------------------------------------------------------------------------------------------------
RUN_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _worker_init():
    """Workers leave the run's signals to the parent: in a process group of their own, Ctrl-C and a SIGTERM to the
    whole group (`timeout`, `kill -- -PGID`) never reach them, so none dies halfway through a task or while holding
    the pool's queue locks; if the parent itself dies, an idle worker reads end-of-file and exits. SIGTERM sent to a
    worker alone gets its default back (the parent's handler would print a traceback here)."""
    os.setpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RUN_SIGNALS)


@contextlib.contextmanager
def worker_pool(workers: int):
    """A fork pool for preprocessing and NMS (None for one worker). However the block ends (done, an error, Ctrl-C,
    SIGTERM) the pool is closed and joined: the workers finish what was queued (at most one batch) and exit.
    Pool.terminate() kills them instead, and then hangs for good if one dies holding the result queue's lock, as one
    halfway through sending a preprocessed image does."""
    if workers <= 1:
        yield None
        return
    # a signal inside Pool() would leave a half-built pool that nothing ends (its thread keeps forking workers and
    # the exit waits on them): Ctrl-C and SIGTERM are held until it is built, and the forked workers inherit that
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, RUN_SIGNALS)
    pool = None
    try:
        pool = mp.get_context("fork").Pool(workers, _worker_init)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        yield pool
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if pool is not None:
            pool.close()
            pool.join()


def _preprocess(args):
    path, imgsz = args
    chw, meta = preprocess(path, imgsz)
    return chw, meta


def coco_results(det, meta, image_id: int) -> list[dict]:
    """One image's detections in letterbox pixels -> COCO results (original pixels, top-left xywh, COCO ids)."""
    det = scale_boxes(det, meta)
    return [{"image_id": image_id, "category_id": COCO80_TO_91[int(c)],
             "bbox": [round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3), round(float(y2 - y1), 3)],
             "score": round(float(s), 5)} for x1, y1, x2, y2, s, c in det]


def predict(backend, files, imgsz=640, batch=32, conf=0.001, iou=0.7, max_det=300, pool=None,
            prep_cache: dict | None = None) -> list[dict]:
    """Detections of every image in COCO results format. `prep_cache` keeps preprocessed images between calls
    (a sweep scores every configuration on the same images)."""
    imap = pool.imap if pool else map
    cache = {} if prep_cache is None else prep_cache
    results = []
    with tqdm(total=len(files), desc="predict", unit="img", leave=False, disable=None) as bar:
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            todo = [p for p in chunk if (p, imgsz) not in cache]
            cache.update(zip([(p, imgsz) for p in todo], imap(_preprocess, [(p, imgsz) for p in todo])))
            pre = [cache[(p, imgsz)] for p in chunk]
            dets = backend.detect(np.stack([c for c, _ in pre]), conf, iou, max_det, imap)
            for det, (_, meta), p in zip(dets, pre, chunk):
                results += coco_results(det, meta, int(p.stem))
            bar.update(len(chunk))
    return results


def coco_stats(coco_gt, detections, image_ids=None) -> tuple[float, float]:
    """COCOeval bbox (mAP50-95, mAP50) of `detections` (COCO results format, not empty) over `image_ids` (default:
    every image of `coco_gt`); COCOeval's printout swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), iouType="bbox", print_function=lambda *_: None)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def coco_map(coco_gt, detections, image_ids) -> dict | None:
    """COCO bbox mAP50-95 and mAP50 over `image_ids`; None where none of them has an annotation (COCOeval's -1:
    there is nothing to recall, so no mAP)."""
    if not coco_gt.getAnnIds(imgIds=list(image_ids)):
        return None
    wanted = set(image_ids)
    dets = [d for d in detections if d["image_id"] in wanted]
    if not dets:
        return {"images": len(image_ids), "map50_95": 0.0, "map50": 0.0}
    map50_95, map50 = coco_stats(coco_gt, dets, image_ids)
    return {"images": len(image_ids), "map50_95": round(map50_95, 5), "map50": round(map50, 5)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_coco(data, annotations) -> None:
    """faster-coco-eval trusts its input: a malformed file fails deep inside it, or is scored without a word
    (no annotations: mAP -1; an unknown category: never matched). Name the first problem instead."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                      "categories")):
        raise UserError(f"{annotations}: not a COCO instances file (needs 'images', 'annotations' and 'categories' "
                        f"lists); pass one like instances_val2017.json")

    def refuse(what):
        raise UserError(f"{annotations}: {what}; fix or remove it (COCO instances format)")

    for kind in ("images", "categories"):
        for n, entry in enumerate(data[kind]):
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
                refuse(f"{kind}[{n}] has no integer id")
    categories = {c["id"] for c in data["categories"]}
    if not data["annotations"]:
        raise UserError(f"{annotations}: holds no annotations, so there is nothing to score; pass the annotations "
                        f"of these images")
    for n, a in enumerate(data["annotations"]):
        where = f"annotations[{n}]"
        if not isinstance(a, dict) or not isinstance(a.get("id"), int):
            refuse(f"{where} has no integer id")
        if not isinstance(a.get("image_id"), int):
            refuse(f"{where} has image_id {a.get('image_id')!r}, not an integer image id")
        if a.get("category_id") not in categories:
            refuse(f"{where} has category_id {a.get('category_id')!r}, which is not one of its categories")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(map(_number, box)) and min(box[2:]) >= 0):
            refuse(f"{where} has bbox {box!r}, not [x, y, width, height] with width and height >= 0")


def find_annotations(image_dir, files) -> Path:
    """<images>/annotations.json, else beside the images/ folder (the layout EVAL_DIR has, given its images/)."""
    candidates = [Path(image_dir) / "annotations.json", files[0].parent.parent / "annotations.json"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UserError(f"{candidates[-1]}: no such COCO annotations file; put annotations.json in the image "
                        f"folder's parent or pass --annotations to python -m tools.evaluate (under make, EVAL_DIR "
                        f"must hold images/ and annotations.json)")
    return found


def read_exact_ids(exact_file: Path) -> set[int]:
    words = exact_file.read_text().split() if exact_file.is_file() else []
    bad = next((w for w in words if not w.isdigit()), None)
    if bad is not None:
        raise UserError(f"{exact_file}: holds {bad!r}, not an image id; list the exact-annotation image ids, "
                        f"one number per line")
    return {int(w) for w in words}


def load_ground_truth(image_dir, annotations=None):
    files = list_images(image_dir)
    if annotations is None:
        annotations = find_annotations(image_dir, files)
    annotations = Path(annotations)
    if not annotations.is_file():
        raise UserError(f"{annotations}: no such annotations file; pass a COCO instances JSON to --annotations")
    try:
        data = json.loads(annotations.read_bytes())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"{annotations}: not JSON ({e}); pass a COCO instances file") from None
    check_coco(data, annotations)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(data)
    missing = [p.name for p in files if not p.stem.isdigit() or int(p.stem) not in coco.imgs]
    if missing:
        raise UserError(f"{annotations}: has no entry for image {missing[0]} (and {len(missing) - 1} more); "
                        f"pass the annotations of this image folder")
    return coco, files, read_exact_ids(annotations.parent / "exact_ids.txt")


def evaluate(model, image_dir, annotations=None, batch=32, imgsz=640, limit=None, workers=None,
             prep_cache: dict | None = None) -> dict:
    coco, files, exact = load_ground_truth(image_dir, annotations)
    files = files[:limit] if limit else files
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    with worker_pool(workers) as pool:
        backend = make_backend(model)  # after the fork: workers never touch CUDA
        dets = predict(backend, files, imgsz, batch, pool=pool, prep_cache=prep_cache)
        getattr(backend, "close", lambda: None)()
    ids = [int(p.stem) for p in files]
    scores = coco_map(coco, dets, ids)
    if scores is None:
        raise UserError(f"{image_dir}: none of the {len(ids)} images scored has an annotation in its annotations.json, "
                        f"so there is no mAP (COCO's -1); score images that have annotations (a larger EVAL_LIMIT, or "
                        f"annotate them)")
    out = {"model": str(model), "backend": backend.name, "image_dir": str(image_dir), "batch": batch, **scores}
    exact_ids = [i for i in ids if i in exact]
    if exact_ids and (exact_scores := coco_map(coco, dets, exact_ids)) is not None:
        out["exact"] = exact_scores
    # two halves (alternate images in file order): a selection rule chooses on one and confirms on the other
    halves = {"a": coco_map(coco, dets, ids[0::2]), "b": coco_map(coco, dets, ids[1::2])}
    if None not in halves.values():
        out["halves"] = halves
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__)
    ap.add_argument("model", help=".onnx (ONNX Runtime) or .engine (TensorRT)")
    ap.add_argument("--images", required=True, help="folder of COCO images named by id (or its parent)")
    ap.add_argument("--annotations", help="COCO instances JSON (default: annotations.json in <images>, else beside "
                                          "its images/ folder)")
    ap.add_argument("--batch", type=positive_int, default=32)
    add_imgsz(ap)
    ap.add_argument("--limit", type=positive_int, help="only the first N images")
    ap.add_argument("--workers", type=positive_int, help="preprocessing/NMS processes (1: none, all in this one)")
    ap.add_argument("-o", "--output", help="JSON to write")
    args = ap.parse_args(argv)
    res = evaluate(args.model, args.images, args.annotations, args.batch, args.imgsz, args.limit, args.workers)
    if args.output:
        write_json(args.output, res)
    line = f"{Path(args.model).name}: mAP50-95 {res['map50_95']:.4f}  mAP50 {res['map50']:.4f}  ({res['images']} images)"
    if "exact" in res:
        line += f"; exact-annotation subset: {res['exact']['map50_95']:.4f} / {res['exact']['map50']:.4f} " \
                f"({res['exact']['images']} images)"
    print(line)


if __name__ == "__main__":
    run_main(main)
