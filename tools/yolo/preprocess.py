"""Preprocessing as ultralytics validates: LoadImage + LetterBox(scaleup=False, center=True), then RGB, CHW, /255.

Imports only numpy and cv2 so that it also runs on the GPU side (py311 + TensorRT, no torch); see
../shared/STYLE.md, "Reproducing ultralytics val".
"""
from __future__ import annotations

import cv2
import numpy as np

from tools.core.errors import UserError

PAD_VALUE = 114


def read_image(path):
    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise UserError(f"{path}: not a readable image; remove it from the folder or replace it")
    return im


def load_resized(im, size: int = 640):
    """ultralytics BaseDataset.load_image: long side to `size` (small images enlarged), INTER_LINEAR."""
    h0, w0 = im.shape[:2]
    r = size / max(h0, w0)
    if r != 1:
        w, h = min(int(np.ceil(w0 * r)), size), min(int(np.ceil(h0 * r)), size)
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    return im


def letterbox(im, size: int = 640):
    """Centre `im` on a size x size canvas of PAD_VALUE, never upscaling; returns (canvas, (left, top))."""
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
