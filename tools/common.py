"""What several tools need: user errors, atomic writes, image lists, letterbox preprocessing, YOLO decoding + NMS.

Imports only numpy and cv2 so that it also runs on the GPU side (py311 + TensorRT, no torch).
Preprocessing and NMS follow ultralytics' validation exactly (see ../shared/STYLE.md, "Reproducing ultralytics val").
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import math
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
PAD_VALUE = 114


class UserError(Exception):
    """A problem with the user's input: printed as one line (naming the file and the fix), exit code 2."""


class Interrupted(KeyboardInterrupt):
    """A termination signal turned into an exception, so `finally` blocks and context managers clean up (temporary
    files, worker pools, child processes) as they do on Ctrl-C. args[0] is the signal number."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_main(main):
    """Run a tool's main(argv): user errors become one line on stderr and exit status 2, never a traceback;
    Ctrl-C and SIGTERM print "interrupted" and exit 128 + the signal number (130 / 143), as a shell reports them."""
    # SIGTERM's default action kills at once: no cleanup, forked workers orphaned, temporary files left behind
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        sys.exit(main(sys.argv[1:]) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + (e.args[0] if isinstance(e, Interrupted) else signal.SIGINT))


# ----------------------------------------------------------------------------------------------------------------
# Command lines
def _int_at_least(text: str, least: int) -> int:
    # ArgumentTypeError (not ValueError) makes argparse print our reason, after the flag's name
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {least} or more, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts and sizes."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type for seeds."""
    return _int_at_least(text, 0)


def builder_level(text: str) -> int:
    """argparse type for TensorRT's builder optimization level (0-5, the range the recipe schema takes)."""
    value = _int_at_least(text, 0)
    if value > 5:
        raise argparse.ArgumentTypeError(f"{text}: builder optimization levels are 0 to 5")
    return value


def _finite(text: str) -> float:
    # float() takes "nan" and "inf": a budget of nan mAP points compares false with everything
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def positive_number(text: str) -> float:
    """argparse type for durations and other amounts above zero."""
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def non_negative_number(text: str) -> float:
    """argparse type for budgets and tolerances: finite, 0 or more."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def image_size(text: str) -> int:
    """argparse type for --imgsz: YOLO's strides need a multiple of 32."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (YOLO's largest stride), not {value}")
    return value


def import_tensorrt(what: str):
    """The tensorrt module, or a one-line error saying `what` needs it and how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise UserError(f"{what} needs TensorRT's Python package, which is not installed here: install it (pip "
                        f"install tensorrt, or pixi's gpu environment) or run it on a machine with TensorRT and a GPU"
                        ) from None
    return tensorrt


def default_trtexec() -> tuple[str, ...]:
    """NVIDIA's trtexec where it is on PATH, else our fallback that takes the same flags."""
    return ("trtexec",) if shutil.which("trtexec") else (sys.executable, "-m", "tools.trtexec_py")


# ----------------------------------------------------------------------------------------------------------------
# Files
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # the disk, not the caller, is the problem


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; pass a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror}: {e.filename}); pass a path in a writable "
                        f"folder") from None
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results unreadable to other users
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        short = e.errno is None and "written" in str(e)  # numpy's tofile reports a short write without an errno
        if e.errno not in FULL and not short:
            raise
        raise UserError(f"{path}: cannot be written ({str(e) if short else os.strerror(e.errno)}); free space there "
                        f"or pass a path on another disk (nothing was written)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds. Otherwise nothing is
    left: neither the temporary folder nor the parent folders made for it."""
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror}: {e.filename}); pass a writable folder") from None
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make results unreadable to other users
    done = False
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made if not done else ():
            with contextlib.suppress(OSError):
                parent.rmdir()


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_images(folder) -> list[Path]:
    """Sorted image files of `folder` (or of `folder/images`); a clear error when there are none."""
    folder = Path(folder)
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder; pass a folder of .jpg/.png images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: holds no .jpg/.png images; pass a folder of images")
    return files


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (ultralytics LoadImage + LetterBox(scaleup=False, center=True), then RGB, CHW, /255)
def read_image(path):
    import cv2

    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise UserError(f"{path}: not a readable image; remove it from the folder or replace it")
    return im


def load_resized(im, size: int = 640):
    """ultralytics BaseDataset.load_image: long side to `size` (small images enlarged), INTER_LINEAR."""
    import cv2

    h0, w0 = im.shape[:2]
    r = size / max(h0, w0)
    if r != 1:
        w, h = min(int(np.ceil(w0 * r)), size), min(int(np.ceil(h0 * r)), size)
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    return im


def letterbox(im, size: int = 640):
    """Centre `im` on a size x size canvas of PAD_VALUE, never upscaling; returns (canvas, (left, top))."""
    import cv2

    h, w = im.shape[:2]
    r = min(size / h, size / w, 1.0)
    new_w, new_h = int(round(w * r)), int(round(h * r))
    if (w, h) != (new_w, new_h):
        im = cv2.resize(im, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return im, (left, top)


def preprocess(path, size: int = 640):
    """Image file -> (uint8 CHW RGB tensor, meta) where meta maps network boxes back to the original image."""
    return preprocess_image(read_image(path), size)


def preprocess_image(im0, size: int = 640):
    """A decoded BGR image (a file's, a video frame) -> (uint8 CHW RGB tensor, meta), as `preprocess`."""
    resized = load_resized(im0, size)
    canvas, pad = letterbox(resized, size)
    chw = np.ascontiguousarray(canvas[:, :, ::-1].transpose(2, 0, 1))
    meta = {"shape0": im0.shape[:2], "shape1": resized.shape[:2], "pad": pad}
    return chw, meta


def to_input(batch_u8: np.ndarray) -> np.ndarray:
    """uint8 NCHW -> the float32 network input in [0, 1]."""
    return batch_u8.astype(np.float32) / 255.0


# ----------------------------------------------------------------------------------------------------------------
# Decoding + NMS (ultralytics non_max_suppression with multi_label=True, agnostic=False, then scale_boxes)
MAX_WH = 7680  # ultralytics' class offset so one NMS call keeps classes apart
MAX_NMS = 30000


def xywh2xyxy(b):
    out = np.empty_like(b)
    out[:, :2] = b[:, :2] - b[:, 2:] / 2
    out[:, 2:] = b[:, :2] + b[:, 2:] / 2
    return out


def nms(boxes, scores, iou_thres):
    """Greedy NMS over boxes sorted by descending score (same rule as torchvision.ops.nms); returns kept indices."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    order = np.arange(len(boxes))
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_thres]
    return np.asarray(keep, dtype=np.int64)


def postprocess(pred, conf=0.001, iou=0.7, max_det=300):
    """One image's raw output [4+nc, anchors] -> detections [n, 6] (x1, y1, x2, y2, score, class) in network pixels."""
    pred = np.asarray(pred, dtype=np.float32)
    boxes, cls = pred[:4].T, pred[4:].T
    i, j = np.nonzero(cls > conf)  # multi-label: one candidate per (anchor, class) above threshold
    if i.size == 0:
        return np.zeros((0, 6), np.float32)
    scores = cls[i, j]
    order = np.argsort(-scores, kind="stable")[:MAX_NMS]
    i, j, scores = i[order], j[order], scores[order]
    xyxy = xywh2xyxy(boxes[i])
    keep = nms(xyxy + j[:, None].astype(np.float32) * MAX_WH, scores, iou)[:max_det]
    return np.concatenate([xyxy[keep], scores[keep, None], j[keep, None].astype(np.float32)], axis=1)


def scale_boxes(det, meta):
    """Network-pixel boxes -> original-image pixels (ultralytics scale_boxes with the loader's resize ratios)."""
    det = det.copy()
    (h0, w0), (h1, w1), (left, top) = meta["shape0"], meta["shape1"], meta["pad"]
    det[:, [0, 2]] = (det[:, [0, 2]] - left) / (w1 / w0)
    det[:, [1, 3]] = (det[:, [1, 3]] - top) / (h1 / h0)
    det[:, [0, 2]] = det[:, [0, 2]].clip(0, w0)
    det[:, [1, 3]] = det[:, [1, 3]].clip(0, h0)
    return det


# COCO's 80 training classes -> the 91 official category ids (ultralytics data/converter.py)
COCO80_TO_91 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
                33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
                60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]

# their names, in ultralytics' order (ultralytics/cfg/datasets/coco.yaml)
COCO80_NAMES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
                "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
                "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
                "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
                "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
                "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
                "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
                "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
                "scissors", "teddy bear", "hair drier", "toothbrush"]
