"""Preprocessing and NMS against ultralytics' own implementations, on real images."""
import numpy as np
import pytest
import torch
from conftest import MINI, MODEL

from tools.core.files import list_images
from tools.yolo.decode import nms, postprocess
from tools.yolo.preprocess import letterbox, load_resized, preprocess, read_image, to_input


@pytest.mark.parametrize("index", [0, 7, 19])
def test_letterbox_matches_ultralytics(index):
    from ultralytics.data.augment import LetterBox

    path = list_images(MINI)[index]
    im = load_resized(read_image(path))
    ours, _ = letterbox(im)
    theirs = LetterBox((640, 640), auto=False, scale_fill=False, scaleup=False, center=True)(image=im)
    assert ours.shape == (640, 640, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_nms_matches_torchvision():
    import torchvision

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 600, (500, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (500, 2)).astype(np.float32)], 1)
    scores = np.sort(rng.uniform(0, 1, 500).astype(np.float32))[::-1].copy()
    ours = nms(boxes, scores, 0.7)
    theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.7).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_postprocess_matches_ultralytics_nms():
    import onnxruntime as ort
    from ultralytics.utils.nms import non_max_suppression

    chw, _ = preprocess(list_images(MINI)[3])
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"images": to_input(chw[None])})[0]
    ours = postprocess(raw[0])
    theirs = non_max_suppression(torch.from_numpy(raw), 0.001, 0.7, multi_label=True, max_det=300)[0].numpy()
    assert len(ours) == len(theirs) > 10
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
