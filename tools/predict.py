"""Detections of images or a video with a recipe's model: annotated copies (boxes, class names, scores) and a JSON.

SOURCE is an image, a folder of images or a video; RECIPE runs on --model's size (make MODEL=). What runs: --model-file
(an engine, or an ONNX for ONNX Runtime), else the recipe's engine of its first deployment profile where TensorRT and
a GPU are, else (a CPU machine) the recipe's ONNX in ONNX Runtime: its quantized model where `make quantize` made it,
else the FP32 model. Preprocessing and decoding are the evaluator's (tools/evaluate.py): an end-to-end engine gets
uint8 pixels and its NMS runs inside (its IoU fixed when it was built; --conf and --max-det filter what it returns).
Writes RESULTS/<model>/predict/<recipe>/: the annotated images under their own names (or <video>.mp4) and
detections.json (per image or frame: boxes x1 y1 x2 y2 in original pixels, class id and name, score). Everything is
written into a temporary folder that replaces the old one only when the run succeeds; a bad input (a file that is
not an image, a video that cannot be opened, a folder without images) is one line, and nothing is written.
Usage: python -m tools.predict SOURCE RECIPE [--model yolo11s] [--model-file FILE] [--conf 0.25] [--iou 0.7]
"""
from __future__ import annotations

import argparse
import ast
import os
import time
from pathlib import Path

import cv2
import numpy as np
import onnx

from tools.core.cli import add_calib_dir, add_calib_images, add_level, add_model, add_results, add_trt, positive_int
from tools.core.errors import UserError, run_main
from tools.core.files import IMAGE_SUFFIXES, REPO, atomic_dir, list_images, write_json
from tools.core.recipe import load
from tools.core.setup import Setup
from tools.evaluate import make_backend
from tools.pipeline import Point, gpu_name, have_tensorrt, quantize_done
from tools.yolo.decode import COCO80_NAMES, scale_boxes
from tools.yolo.preprocess import preprocess_image, read_image

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def read_source(source) -> tuple[str, list[Path] | Path]:
    """("images", files) or ("video", file); a missing or unknown source is one line saying what to pass."""
    source = Path(source)
    if source.is_dir():
        return "images", list_images(source)
    if not source.is_file():
        raise UserError(f"{source}: no such file or folder; set SOURCE= to an image, a folder of images or a video")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return "images", [source]
    if source.suffix.lower() in VIDEO_SUFFIXES:
        return "video", source
    raise UserError(f"{source}: neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a video "
                    f"({', '.join(VIDEO_SUFFIXES)}); pass one of those or a folder of images")


def class_names(model) -> list[str]:
    """The class names an ultralytics ONNX export carries in its metadata, else COCO's 80."""
    if Path(model).suffix == ".onnx":
        props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        try:
            names = ast.literal_eval(props.get("names", "None"))
        except (ValueError, SyntaxError):
            names = None
        if isinstance(names, dict) and sorted(names) == list(range(len(names))):
            return [str(names[i]) for i in range(len(names))]
    return list(COCO80_NAMES)


def choose_model(recipe, setup, profile: str | None = None) -> tuple[Path, str]:
    """The recipe's model for this machine, and a note on the choice."""
    recipe = setup.adapt(recipe)
    if have_tensorrt() and gpu_name() != "unknown GPU":
        profile = profile or next(iter(recipe.profiles))
        if profile not in recipe.profiles:
            raise UserError(f"recipe {recipe.name!r} has no profile {profile!r}; its profiles are "
                            f"{', '.join(recipe.profiles)}")
        point = Point(recipe, setup, profile)
        if not point.engine_path.is_file():
            raise UserError(f"{point.engine_path}: recipe {recipe.name!r} has no engine for profile {profile} on this "
                            f"GPU yet; build it (make engine RECIPE=...) or pass MODEL_FILE=engine-or-onnx")
        return point.engine_path, f"TensorRT engine of profile {profile}"
    point = Point(recipe, setup)
    if recipe.quantized and quantize_done(point):
        return point.onnx, "ONNX Runtime, the recipe's quantized model"
    note = "ONNX Runtime, the FP32 model"
    if recipe.quantized:
        note += f" (recipe {recipe.name}'s quantized model is not made yet: make quantize RECIPE=... makes it)"
    return point.model_onnx, note


# ----------------------------------------------------------------------------------------------------------------
def detections(det: np.ndarray, names: list[str]) -> list[dict]:
    return [{"box": [round(float(v), 2) for v in d[:4]], "class_id": int(d[5]),
             "class_name": names[int(d[5])] if int(d[5]) < len(names) else str(int(d[5])),
             "score": round(float(d[4]), 4)} for d in det]


def color(class_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(class_id)
    return tuple(int(c) for c in rng.integers(64, 256, 3))


def annotate(image: np.ndarray, dets: list[dict]) -> np.ndarray:
    """A copy of the BGR image with each detection's box and `name score` label."""

    out = image.copy()
    scale = max(0.4, min(out.shape[:2]) / 1000)
    thick = max(2, round(3 * scale))
    for d in dets:
        x1, y1, x2, y2 = (int(round(v)) for v in d["box"])
        c = color(d["class_id"])
        cv2.rectangle(out, (x1, y1), (x2, y2), c, thick)
        label = f"{d['class_name']} {d['score']:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick - 1)
        top = max(y1, th + base)
        cv2.rectangle(out, (x1, top - th - base), (x1 + tw, top), c, -1)
        cv2.putText(out, label, (x1, top - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick - 1, cv2.LINE_AA)
    return out


class Predictor:
    """A backend of tools.evaluate and the thresholds: BGR images in, detections in original pixels out."""

    def __init__(self, model, imgsz: int, conf: float, iou: float, max_det: int):
        self.backend = make_backend(model)
        self.imgsz, self.conf, self.iou, self.max_det = imgsz, conf, iou, max_det
        self.batch = getattr(self.backend, "static_batch", None) or 8
        self.names = class_names(model)

    def __call__(self, images: list[np.ndarray]) -> list[list[dict]]:
        pre = [preprocess_image(im, self.imgsz) for im in images]
        dets = self.backend.detect(np.stack([c for c, _ in pre]), self.conf, self.iou, self.max_det)
        return [detections(scale_boxes(d, meta), self.names) for d, (_, meta) in zip(dets, pre)]

    def close(self):
        getattr(self.backend, "close", lambda: None)()


def predict_images(predictor: Predictor, files: list[Path], out: Path) -> list[dict]:
    results = []
    for start in range(0, len(files), predictor.batch):
        chunk = files[start:start + predictor.batch]
        images = [read_image(p) for p in chunk]
        for path, image, dets in zip(chunk, images, predictor(images)):
            if not cv2.imwrite(str(out / path.name), annotate(image, dets)):
                raise UserError(f"{out / path.name}: OpenCV could not write it; check the free space and the name")
            results.append({"file": path.name, "width": image.shape[1], "height": image.shape[0],
                            "detections": dets})
    return results


def predict_video(predictor: Predictor, video: Path, out: Path) -> dict:
    """Every frame of `video`, annotated into <out>/<stem>.mp4 (or <out>/frames/*.jpg where OpenCV has no mp4
    encoder); returns the frames' detections."""

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg quiet: a bad file gets our one line, not its log
    cap = cv2.VideoCapture(str(video))
    ok, frame = cap.read() if cap.isOpened() else (False, None)
    if not ok:
        cap.release()
        raise UserError(f"{video}: OpenCV cannot open or decode this video; pass a video it reads (e.g. H.264 .mp4) "
                        f"or its frames as a folder of images")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    height, width = frame.shape[:2]
    target = out / f"{video.stem}.mp4"
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    frames_dir = None
    if not writer.isOpened():
        frames_dir = out / "frames"
        frames_dir.mkdir()
    frames, index, pending = [], 0, [frame]

    def flush():
        nonlocal index
        for image, dets in zip(pending, predictor(pending)):
            annotated = annotate(image, dets)
            if frames_dir is None:
                writer.write(annotated)
            else:
                cv2.imwrite(str(frames_dir / f"{index:06d}.jpg"), annotated)
            frames.append({"frame": index, "detections": dets})
            index += 1
        pending.clear()

    try:
        while True:
            if len(pending) == predictor.batch:
                flush()
            ok, frame = cap.read()
            if not ok:
                break
            pending.append(frame)
        flush()
    finally:
        cap.release()
        writer.release()
    return {"video": video.name, "fps": fps, "width": width, "height": height, "output": (frames_dir or target).name,
            "frames": frames}


def run(source, recipe, setup, model=None, profile=None, conf=0.25, iou=0.7, max_det=300) -> Path:
    """Predict `source` with `recipe`'s model (or `model`); returns the folder written."""
    kind, found = read_source(source)
    if model is not None:
        model, note = Path(model), "the model given"
        if not model.is_file():
            raise UserError(f"{model}: no such model; MODEL_FILE= takes an engine (make engine) or an ONNX")
    else:
        model, note = choose_model(recipe, setup, profile)
    layout = setup.layout(recipe.model)
    folder = layout.predict(recipe.name)
    t0 = time.perf_counter()
    predictor = Predictor(model, recipe.imgsz, conf, iou, max_det)
    if predictor.backend.nms:
        note += "; NMS inside the engine (IoU fixed at build time, conf and max_det filter its output)"
    try:
        with atomic_dir(folder) as tmp:
            if kind == "images":
                body = {"images": predict_images(predictor, found, tmp)}
            else:
                body = predict_video(predictor, found, tmp)
            write_json(tmp / "detections.json", {
                "source": str(source), "recipe": recipe.name, "model": layout.rel(Path(model).resolve()),
                "backend": predictor.backend.name, "note": note, "imgsz": recipe.imgsz, "conf": conf, "iou": iou,
                "max_det": max_det, "boxes": "x1 y1 x2 y2 in original pixels", **body})
    finally:
        predictor.close()
    count = len(body.get("images") or body.get("frames"))
    dets = sum(len(x["detections"]) for x in body.get("images") or body.get("frames"))
    print(f"{recipe.name}: {dets} detections in {count} {'images' if kind == 'images' else 'frames'} with "
          f"{predictor.backend.name} ({note}) in {time.perf_counter() - t0:.1f} s -> {folder}")
    return folder


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="an image, a folder of images or a video")
    ap.add_argument("recipe", help="recipes/<name>.yaml")
    add_model(ap)
    ap.add_argument("--model-file", help="an engine or ONNX to run instead of the recipe's own (make MODEL_FILE=)")
    ap.add_argument("--profile", help="the recipe's deployment profile whose engine runs (default: its first)")
    ap.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25, ultralytics predict's)")
    ap.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    ap.add_argument("--max-det", type=positive_int, default=300)
    add_results(ap, overwrite=False)
    add_calib_dir(ap)  # the recipe's calibration images name its quantized model
    add_calib_images(ap)
    add_level(ap)
    add_trt(ap)
    args = ap.parse_args(argv)
    if not 0 <= args.conf < 1 or not 0 < args.iou <= 1:
        raise UserError(f"--conf {args.conf} / --iou {args.iou}: need 0 <= conf < 1 and 0 < iou <= 1 (CONF=, IOU=)")
    recipe = load(args.recipe, args.model)
    setup = Setup(calib_dir=Path(args.calib_dir), eval_dir=REPO / "data" / "coco-mini",
                  results=Path(args.results).resolve(), level=args.level, trt_version=args.trt,
                  calib_images=args.calib_images)
    run(args.source, recipe, setup, args.model_file, args.profile, args.conf, args.iou, args.max_det)


if __name__ == "__main__":
    run_main(main)
