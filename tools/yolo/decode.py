"""Decoding + NMS as ultralytics validates (non_max_suppression with multi_label=True, agnostic=False, then
scale_boxes), and COCO's class tables. numpy only, so that it also runs on the GPU side.
"""
from __future__ import annotations

import numpy as np

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
