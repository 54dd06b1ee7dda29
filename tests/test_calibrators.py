"""Histogram calibration (mse, percentile): known answers on made-up data, then the real model on 4 calibration
images - the collected ranges reproduce ModelOpt's max calibration, the new scales stay within it, and a quantized
model carries the cache's scales."""
import json

import numpy as np
import onnx
import pytest
from conftest import CALIB, MODEL, REPO

from tools.core.errors import UserError
from tools.core.recipe import from_dict, load
from tools.quantize import activation_scales, calibrate, quantize, quantized_path, read_cache
from tools.yolo.calibrators import MAX_BINS, Histogram, fixed_amax, histogram_scales, load_histograms, mse_amax, \
    percentile_amax, scale_groups


def filled(*batches) -> Histogram:
    h = Histogram()
    for b in batches:
        h.add(b)
    return h


def test_percentile_of_uniform_values():
    rng = np.random.default_rng(0)
    # the first batch spans half the range, so the histogram has to grow
    h = filled(rng.uniform(0, 0.5, 10_000), rng.uniform(-1, 1, 1_000_000))
    assert h.counts.sum() == 1_010_000 and h.amax <= 1
    assert percentile_amax(h, 99) == pytest.approx(0.99, abs=2e-3)
    assert percentile_amax(h, 100) == h.amax
    with pytest.raises(UserError, match="calibration_percentile"):
        percentile_amax(h, 0)


def test_mse_clips_an_outlier_at_the_brute_force_optimum():
    normal = np.random.default_rng(1).normal(0, 1, 1_000_000)
    # a narrow first batch, then an outlier 100 sigma out: the histogram outgrows MAX_BINS and merges bins
    batches = [normal[:1000] / 10, normal, np.array([100.0])]
    h = filled(*batches)
    assert h.amax == 100 and h.counts.sum() == 1_001_001 and h.counts.size <= MAX_BINS
    amax = mse_amax(h)
    assert amax < 25  # far below the outlier: clipping it costs less than 127 steps spread over its range
    x = np.concatenate(batches)

    def mse(a):  # int8 symmetric fake quantization of the raw values
        return np.mean((np.clip(np.round(x / (a / 127)), -127, 127) * (a / 127) - x) ** 2)

    assert mse(amax) <= 1.01 * min(mse(a) for a in np.arange(2, 40, 0.5))


def test_all_zero_batches_then_data():
    h = filled(np.zeros(100), np.array([0.0, 2.0]))
    assert h.counts[0] == 101 and h.amax == 2.0 and h.counts.sum() == 102
    for method in ("mse", "percentile"):
        with pytest.raises(UserError, match="tensor t is zero on every calibration image"):
            histogram_scales({"t": filled(np.zeros(10))}, {"t": "t"}, method)


def test_concat_inputs_share_the_output_scale():
    model = onnx.load(str(MODEL))
    concat = next(n for n in model.graph.node if n.name == "/model.9/Concat")
    groups = scale_groups(model, [*concat.input, concat.output[0], "images"])
    assert len({groups[t] for t in [*concat.input, concat.output[0]]}) == 1
    assert groups["images"] == "images"


# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    recipe = load(REPO / "recipes/int8-qdq.yaml").replace(calib_images=4)
    caches = {m: read_cache(calibrate(recipe.replace(calibration_method=m), CALIB, None, root))
              for m in ("max", "mse", "percentile")}
    return root, recipe, caches


def test_histograms_reproduce_modelopt_max_calibration(calibrated):
    root, _, caches = calibrated
    hists = load_histograms(next((root / "calib" / "yolo11n").glob("*.hist-*.npz")))
    model = onnx.load(str(MODEL))
    groups = scale_groups(model, caches["max"])
    fixed = fixed_amax(model, caches["max"])
    assert set(fixed) == {"/model.23/dfl/Softmax_output_0"}
    for t, scale in caches["max"].items():
        amax = fixed.get(t, hists[groups[t]].amax)
        assert amax / 127 == pytest.approx(scale, rel=1e-5), t


def test_new_scales_lie_within_max(calibrated):
    _, _, caches = calibrated
    assert set(caches["mse"]) == set(caches["percentile"]) == set(caches["max"])
    for t, top in caches["max"].items():
        assert 0 < caches["mse"][t] <= top * (1 + 1e-6), t
        assert 0 < caches["percentile"][t] <= top * (1 + 1e-6), t
    # not just max under another name: the histogram methods clip most tensors
    assert sum(caches["mse"][t] < 0.9 * top for t, top in caches["max"].items()) > len(caches["max"]) / 2


def test_modelopt_reads_our_cache(calibrated):
    from modelopt.onnx.quantization.calib_utils import import_scales_from_calib_cache

    root, _, caches = calibrated
    path = next((root / "calib" / "yolo11n").glob("*.mse-*.cache"))
    theirs = import_scales_from_calib_cache(str(path))
    assert theirs == {f"{t}_scale": s for t, s in caches["mse"].items()}


def test_quantize_with_mse_carries_the_cache_scales(calibrated):
    root, recipe, caches = calibrated
    path = quantize(recipe.replace(calibration_method="mse"), "8.6", CALIB, root=root)
    ours = activation_scales(path)
    assert len(ours) > 50 and set(ours) <= set(caches["mse"])
    for t, s in ours.items():
        assert np.float32(s) == np.float32(caches["mse"][t]), t
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["settings"]["calibration_method"] == "mse" and "--calibration_method max" in meta["command"]


def test_each_percentile_has_its_own_cache_and_model(calibrated):
    root, recipe, _ = calibrated
    a, b = (recipe.replace(calibration_method="percentile", calibration_percentile=p) for p in (99.99, 99.9))
    assert calibrate(a, CALIB, None, root) != calibrate(b, CALIB, None, root)
    assert quantized_path(a, "fp32", root, "x") != quantized_path(b, "fp32", root, "x")
    # the percentile is no setting of other methods: their keys stay what they were
    assert "calibration_percentile" not in recipe.settings()
    with pytest.raises(UserError, match="calibration_percentile"):
        from_dict({"name": "x", "precision": "int8-qdq", "calibration_method": "percentile",
                   "calibration_percentile": 100.5})
