"""make predict on the CPU (ONNX Runtime): annotated images and video plus their detections, as the evaluator finds
them; every bad input is one line, rc != 0, and leaves nothing written."""
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import MINI, MODEL, REPO, run_tool

from tools.core.files import list_images
from tools.yolo.decode import COCO80_NAMES

FP16 = "recipes/fp16.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    for p in list_images(MINI)[:3]:
        shutil.copy(p, folder / p.name)
    return folder


def make_predict(results, *knobs):
    return subprocess.run(["make", "-s", f"PY={sys.executable}", "predict", f"RESULTS={results}", *knobs], cwd=REPO,
                          capture_output=True, text=True)


def test_make_predict_writes_annotated_images_and_their_detections(tmp_path, images):
    res = make_predict(tmp_path, f"SOURCE={images}", f"RECIPE={FP16}")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "yolo11n/predict/fp16"
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in images.iterdir()] + ["detections.json"])
    data = json.loads((out / "detections.json").read_text())
    assert data["conf"] == 0.25 and data["model"] == "models/yolo11/yolo11n.onnx" and "onnxruntime" in data["backend"]
    for entry in data["images"]:
        src = cv2.imread(str(images / entry["file"]))
        drawn = cv2.imread(str(out / entry["file"]))
        assert drawn.shape == src.shape and (entry["height"], entry["width"]) == src.shape[:2]
        assert entry["detections"] and not np.array_equal(drawn, src)  # boxes were drawn
        for d in entry["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= entry["width"] and 0 <= y1 < y2 <= entry["height"] and d["score"] > 0.25
            assert d["class_name"] == COCO80_NAMES[d["class_id"]]


def test_detections_are_the_evaluators(tmp_path, images):
    """Same boxes as tools.evaluate.predict (COCO xywh there) at the same thresholds."""
    from tools.evaluate import OnnxrtBackend, predict

    res = run_tool("tools.predict", str(images), FP16, "--results", str(tmp_path), "--conf", "0.25")
    assert res.returncode == 0, res.stderr
    ours = json.loads((tmp_path / "yolo11n/predict/fp16/detections.json").read_text())["images"]
    ref = predict(OnnxrtBackend(MODEL), sorted(images.iterdir()), batch=3, conf=0.25)
    for entry in ours:
        want = [(d["bbox"], d["score"]) for d in ref if d["image_id"] == int(entry["file"].split(".")[0])]
        got = [d["box"] for d in entry["detections"]]
        assert len(got) == len(want)
        for (x1, y1, x2, y2), ((x, y, w, h), _) in zip(got, want):
            assert np.allclose([x1, y1, x2 - x1, y2 - y1], [x, y, w, h], atol=0.02)


def test_a_video_gives_an_annotated_video(tmp_path, images):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (640, 480))
    frames = [cv2.resize(cv2.imread(str(p)), (640, 480)) for p in sorted(images.iterdir())] * 3
    for f in frames:
        writer.write(f)
    writer.release()
    res = run_tool("tools.predict", str(video), FP16, "--results", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "runs/yolo11n/predict/fp16"
    data = json.loads((out / "detections.json").read_text())
    assert [f["frame"] for f in data["frames"]] == list(range(len(frames))) and data["output"] == "clip.mp4"
    cap = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == len(frames)
    cap.release()
    assert all(f["detections"] for f in data["frames"])


def bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/readme.txt").write_text("no images here")
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 100)
    (tmp_path / "fake.jpg").write_bytes(b"not an image")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in list_images(MINI)[:2]:
        shutil.copy(p, mixed / p.name)
    (mixed / "zzz.jpg").write_bytes(b"not an image")  # after the good ones: they were written, then rolled back
    return {"empty": ("empty", "holds no .jpg/.png images"), "no images": ("notes", "holds no .jpg/.png images"),
            "video": ("broken.mp4", "cannot open or decode this video"), "image": ("fake.jpg", "not a readable image"),
            "mixed": ("mixed", "zzz.jpg: not a readable image"), "missing": ("nope", "no such file or folder"),
            "other file": ("notes/readme.txt", "neither an image")}


@pytest.mark.parametrize("case", ["empty", "no images", "video", "image", "mixed", "missing", "other file"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    source, message = bad_sources(tmp_path)[case]
    results = tmp_path / "runs"
    res = make_predict(results, f"SOURCE={tmp_path / source}", f"RECIPE={FP16}")
    assert res.returncode != 0 and message in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if not line.startswith("make")]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert not results.exists()


def test_a_failed_run_keeps_the_previous_output(tmp_path, images):
    assert run_tool("tools.predict", str(images), FP16, "--results", str(tmp_path)).returncode == 0
    out = tmp_path / "yolo11n/predict/fp16"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "fake.jpg").write_bytes(b"not an image")
    assert run_tool("tools.predict", str(tmp_path / "fake.jpg"), FP16, "--results", str(tmp_path)).returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["fp16"]  # no temporary folder left beside it


@pytest.mark.parametrize("knob,flag", [("SOURCE=clip.mp4", 'tools.predict "clip.mp4"'), ("CONF=0.5", "--conf 0.5"),
                                       ("IOU=0.6", "--iou 0.6"), ("MODEL_FILE=e.engine", '--model-file "e.engine"'),
                                       ("RECIPE=recipes/fp16-e2e.yaml", "recipes/fp16-e2e.yaml")])
def test_predict_knobs_reach_the_tool(knob, flag):
    res = subprocess.run(["make", "-s", "-n", f"PY={sys.executable}", "predict", knob], cwd=REPO, capture_output=True,
                         text=True)
    assert flag in res.stdout, res.stdout + res.stderr
