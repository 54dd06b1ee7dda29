"""Histogram calibration of activations (mse, percentile) written as a TensorRT calibration cache for ModelOpt.

ModelOpt's ONNX PTQ calibrates INT8 activations with entropy or max only, but it also takes a TensorRT-format cache
(`--calibration_cache_path`), so a new method is a new cache, not a fork of ModelOpt. Scales are what TensorRT
executes: per tensor, symmetric, scale = amax / 127.

- Which tensors: the ones ModelOpt quantizes, i.e. the keys of its `max` cache on the same images (tools.quantize
  makes that cache, and its values double as a check: our histograms' ranges must reproduce them).
- Grouping as ModelOpt does it: a Concat's quantized inputs and its output share one scale (ModelOpt feeds each
  member's data to every member's calibrator, `get_concat_eliminated_tensors`), so TensorRT can drop the Q/DQ pairs
  around the Concat. Here a group gets one histogram of all its members' values.
- Softmax outputs keep amax 1 whatever the method: ModelOpt's entropy and max caches hold 1/127 for them, since the
  ONNX Runtime quantizer under ModelOpt fixes a Softmax's range to [0, 1] (`adjust_tensor_ranges`).
- Collection: the FP32 model runs in ONNX Runtime with those tensors as extra outputs, a few images at a time, and
  each batch goes into a fixed-width histogram of |x| that grows as larger values arrive.
- amax, after NVIDIA pytorch-quantization's HistogramCalibrator (tools/pytorch-quantization/pytorch_quantization/
  calib/histogram.py in NVIDIA/TensorRT: first batch spread over 2048 bins from 0, wider data appends bins of the same
  width; `_compute_amax_mse` tries the bin centres from bin 128 on as amax and keeps the one whose int8 fake
  quantization of the centres has the least count-weighted squared error; `_compute_amax_percentile` takes the bin
  where the CDF reaches the percentile). Two changes: percentile takes that bin's upper edge (pytorch-quantization
  takes its lower edge), capped at the true maximum, so percentile 100 is exactly max; and a histogram that would
  outgrow MAX_BINS merges neighbouring bins instead of growing without bound.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from tools.core.errors import UserError
from tools.core.files import atomic_path

NUM_BINS = 2048  # pytorch-quantization's default
MAX_BINS = 1 << 16  # a tensor whose range grows 32x past its first batch's merges bins rather than use more memory
MSE_START_BIN = 128  # pytorch-quantization's start_bin: amax below 1/16 of the first batch's range is never tried
INT8_MAX = 127
HISTOGRAM_METHODS = ("mse", "percentile")


class Histogram:
    """Counts of |x| in bins [i*width, (i+1)*width) from 0, and the exact maximum seen."""

    def __init__(self, num_bins: int = NUM_BINS, max_bins: int = MAX_BINS):
        self.num_bins, self.max_bins = num_bins, max_bins
        self.width = 0.0  # set by the first batch with a non-zero value
        self.counts = np.zeros(1, np.int64)  # until then every value is 0 and lands in bin 0
        self.amax = 0.0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, np.float32).ravel())
        top = float(a.max()) if a.size else 0.0
        if top == 0.0:
            self.counts[0] += a.size
            return
        if self.width == 0.0:
            self.width = top / self.num_bins
        self.amax = max(self.amax, top)
        needed = int(top / self.width) + 1
        while needed > self.max_bins:
            self._merge_pairs()
            needed = int(top / self.width) + 1
        if needed > self.counts.size:
            self.counts = np.concatenate([self.counts, np.zeros(needed - self.counts.size, np.int64)])
        # float32 rounding can put the top value one bin past `needed`: clip it into the last bin
        idx = np.minimum((a * np.float32(1 / self.width)).astype(np.int64), self.counts.size - 1)
        self.counts += np.bincount(idx, minlength=self.counts.size)

    def _merge_pairs(self) -> None:
        """Halve the resolution: bins 2i and 2i+1 become bin i."""
        counts = np.concatenate([self.counts, np.zeros(self.counts.size % 2, np.int64)])
        self.counts = counts.reshape(-1, 2).sum(axis=1)
        self.width *= 2


def percentile_amax(h: Histogram, percentile: float) -> float:
    """Smallest bin upper edge below which `percentile` % of the values lie, capped at the maximum."""
    if not 0 < percentile <= 100:
        raise UserError(f"calibration_percentile must lie in (0, 100], not {percentile}")
    cdf = np.cumsum(h.counts)
    idx = int(np.searchsorted(cdf, cdf[-1] * (percentile / 100)))
    return min((idx + 1) * h.width, h.amax)


def mse_amax(h: Histogram, start_bin: int = MSE_START_BIN, chunk: int = 256) -> float:
    """The bin centre that, as amax of symmetric int8, gives the least expected squared error over the histogram."""
    centres = (np.arange(h.counts.size) + 0.5) * h.width
    used = h.counts > 0  # empty bins add nothing to any candidate's error
    x, n = centres[used], h.counts[used].astype(np.float64)
    candidates = centres[min(start_bin, h.counts.size - 1):]
    errors = []
    for start in range(0, candidates.size, chunk):
        amax = candidates[start:start + chunk, None]
        step = amax / INT8_MAX
        q = np.minimum(np.round(x / step), INT8_MAX) * step  # |x| >= 0, so only the top end clips
        errors.append(((q - x) ** 2 * n).sum(axis=1))
    return min(float(candidates[int(np.argmin(np.concatenate(errors)))]), h.amax)


def amax_of(h: Histogram, method: str, percentile: float = 99.99) -> float:
    if h.amax == 0:  # only zeros seen: no range to search (histogram_scales names the tensor)
        return 0.0
    if method == "mse":
        return mse_amax(h)
    if method == "percentile":
        return percentile_amax(h, percentile)
    raise UserError(f"calibration method {method!r} is not histogram-based; use one of {HISTOGRAM_METHODS}")


# ----------------------------------------------------------------------------------------------------------------
def scale_groups(onnx_model, tensors) -> dict[str, str]:
    """{tensor: group}: a quantized Concat output and its quantized inputs form one group (union-find, as ModelOpt's
    get_concat_eliminated_tensors); every other tensor is its own group."""
    tensors = set(tensors)
    parent = {t: t for t in tensors}

    def root(t):
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for node in onnx_model.graph.node:
        if node.op_type == "Concat" and node.output[0] in tensors:
            for i in node.input:
                if i in tensors:
                    parent[root(i)] = root(node.output[0])
    return {t: root(t) for t in sorted(tensors)}


def fixed_amax(onnx_model, tensors) -> dict[str, float]:
    """{tensor: amax} of the tensors whose range is known without calibration: Softmax outputs, [0, 1]."""
    tensors = set(tensors)
    return {n.output[0]: 1.0 for n in onnx_model.graph.node if n.op_type == "Softmax" and n.output[0] in tensors}


def collect(onnx_path, calibration_npy, groups: dict[str, str], batch: int = 8, log=print) -> dict[str, Histogram]:
    """One |x| histogram per group over the calibration tensor (N x C x H x W float32, read `batch` images at a
    time so memory stays bounded), from the FP32 model run in ONNX Runtime with the group members as outputs."""

    model = onnx.load(str(onnx_path))
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    fetched = [t for t in groups if t not in inputs]
    missing = sorted(set(fetched) - {o for n in model.graph.node for o in n.output})
    if missing:
        raise UserError(f"{onnx_path}: has no tensor {missing[0]} (and {len(missing) - 1} more) that the calibration "
                        f"cache names; the cache was made from another model")
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in fetched if t not in outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    data = np.load(calibration_npy, mmap_mode="r")
    hists = {g: Histogram() for g in set(groups.values())}
    for start in range(0, len(data), batch):
        x = np.ascontiguousarray(data[start:start + batch])
        values = dict(zip(fetched, session.run(fetched, {input_name: x})))
        values.update({t: x for t in groups if t in inputs})
        for t, v in values.items():
            hists[groups[t]].add(v)
        log(f"  histograms: {min(start + batch, len(data))}/{len(data)} images")
    return hists


def save_histograms(path, hists: dict[str, Histogram]) -> None:
    names = sorted(hists)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, names=np.array(names), widths=np.array([hists[g].width for g in names]),
                     amaxes=np.array([hists[g].amax for g in names]),
                     sizes=np.array([hists[g].counts.size for g in names]),
                     counts=np.concatenate([hists[g].counts for g in names]))


def load_histograms(path) -> dict[str, Histogram]:
    with np.load(path) as z:
        bounds = np.concatenate([[0], np.cumsum(z["sizes"])])
        hists = {}
        for i, name in enumerate(z["names"]):
            h = hists[str(name)] = Histogram()
            h.width, h.amax = float(z["widths"][i]), float(z["amaxes"][i])
            h.counts = z["counts"][bounds[i]:bounds[i + 1]].copy()
    return hists


def histogram_scales(hists: dict[str, Histogram], groups: dict[str, str], method: str, percentile: float = 99.99,
                     fixed: dict[str, float] | None = None) -> dict[str, float]:
    """{tensor: scale} with scale = amax / 127: one amax per group, `fixed` amax where given."""
    amax = {g: amax_of(h, method, percentile) for g, h in hists.items()}
    amax.update({groups[t]: a for t, a in (fixed or {}).items()})
    empty = sorted(g for g, a in amax.items() if a <= 0)
    if empty:
        raise UserError(f"tensor {empty[0]} is zero on every calibration image: no scale can be calibrated for it; "
                        f"exclude its consumer (nodes_to_exclude) or calibrate on other images")
    return {t: amax[g] / INT8_MAX for t, g in groups.items()}
