"""COCO mAP on real images, and agreement with ultralytics' own validation of the same ONNX."""
import json
import shutil

import pytest
import yaml
from conftest import MINI, MODEL, REPO

from tools.core.errors import UserError
from tools.evaluate import evaluate


def test_map_on_shipped_images():
    res = evaluate(MODEL, MINI, workers=2)
    assert res["images"] == 32 and 0.3 < res["map50_95"] < 0.6 and res["map50"] > res["map50_95"]
    assert res["exact"]["images"] == 32  # the shipped set holds only exact-annotation images


def test_agrees_with_ultralytics_validation(tmp_path):
    """ultralytics val (square 640, batch 1, COCO-json evaluation) on the same images, within 0.3 mAP points."""
    from ultralytics.models.yolo.detect import DetectionValidator

    root = tmp_path / "coco"
    (root / "images" / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    shutil.copytree(MINI / "labels", root / "labels" / "val2017")
    names = []
    for p in sorted((MINI / "images").iterdir()):
        shutil.copy(p, root / "images" / "val2017")
        names.append(f"./images/val2017/{p.name}")
    (root / "val2017.txt").write_text("\n".join(names) + "\n")
    shutil.copy(MINI / "annotations.json", root / "annotations" / "instances_val2017.json")
    data = yaml.safe_load((REPO.parent / "shared/assets/coco/coco.yaml").read_text()) \
        if (REPO.parent / "shared/assets/coco/coco.yaml").is_file() else {"names": {i: str(i) for i in range(80)}}
    data = {"path": str(root), "train": "val2017.txt", "val": "val2017.txt", "names": data["names"]}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    validator = DetectionValidator(args=dict(model=str(MODEL), data=str(root / "data.yaml"), imgsz=640, batch=1,
                                             rect=False, save_json=True, plots=False, device="cpu",
                                             project=str(tmp_path), name="val"))
    stats = validator()
    theirs = stats["metrics/mAP50-95(B)"]
    ours = evaluate(MODEL, MINI, workers=2)["map50_95"]
    assert abs(ours - theirs) * 100 <= 0.3, (ours, theirs)


def test_missing_annotations_named(tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(MINI / "images", folder / "images")
    with pytest.raises(UserError, match="annotations"):
        evaluate(MODEL, folder)
    ann = json.loads((MINI / "annotations.json").read_text())
    ann["images"] = ann["images"][1:]
    (folder / "annotations.json").write_text(json.dumps(ann))
    with pytest.raises(UserError, match="has no entry for image"):
        evaluate(MODEL, folder)


def test_scorer_matches_pycocotools():
    """faster-coco-eval (our scorer) against pycocotools' reference COCOeval on the same real detections."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from tools.evaluate import OnnxrtBackend, coco_map, load_ground_truth, predict

    gt, files, _ = load_ground_truth(MINI)
    dets = predict(OnnxrtBackend(MODEL), files[:12], batch=4)
    ids = [int(p.stem) for p in files[:12]]
    ours = coco_map(gt, dets, ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ref_gt = COCO(str(MINI / "annotations.json"))
        ev = COCOeval(ref_gt, ref_gt.loadRes(dets), "bbox")
        ev.params.imgIds = sorted(ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours["map50_95"] > 0.2
    assert abs(ours["map50_95"] - ev.stats[0]) < 1e-4 and abs(ours["map50"] - ev.stats[1]) < 1e-4


def test_predict_prefilter_keeps_every_detection():
    """predict() drops anchors with no class above conf before NMS; the detections must equal postprocess on the
    whole output, image by image (real outputs of the shipped images)."""
    from tools.yolo.decode import postprocess
    from tools.yolo.preprocess import preprocess, to_input
    from tools.evaluate import OnnxrtBackend, coco_results, load_ground_truth, predict

    _, files, _ = load_ground_truth(MINI)
    files = files[:6]
    backend = OnnxrtBackend(MODEL)
    dets = predict(backend, files, batch=3)
    expected = []
    for p in files:
        chw, meta = preprocess(p)
        raw = backend.infer(to_input(chw[None]))[0]
        expected += coco_results(postprocess(raw, 0.001, 0.7, 300), meta, int(p.stem))
        assert (raw[4:].max(axis=0) > 0.001).mean() < 0.9  # the filter has something to drop
    assert dets == expected and len(dets) > 100
