"""The ultralytics drop-in copy of an engine: its header is read by ultralytics' own code (the header parser, then
AutoBackend and YOLO.predict over a stand-in for TensorRT, since no engine can be built or run here), and the repo's
engine readers take the copy and plain engines alike."""
import ast
import contextlib
import ctypes
import importlib.machinery
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MINI, MODEL, REPO, run_tool
from test_robustness import one_line_error

from tools.core.errors import UserError
from tools.core.layout import Layout
from tools.core.recipe import load, to_dict
from tools.ultralytics_engine import engine_bytes, from_records, metadata, read, write

PAYLOAD = b"ftrt" + bytes(range(256)) * 64  # stands for a serialized engine: TensorRT plans open with a 4-letter tag
RECIPE = REPO / "recipes/int8-qdq.yaml"


def names_of(onnx_path):
    return ast.literal_eval({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["names"])


@pytest.fixture
def b32(tmp_path):
    """A batch-32 INT8 engine's drop-in copy, as make ultralytics writes it for the b32 profile."""
    return write(PAYLOAD, metadata(MODEL, 32, False, 640, 8), tmp_path / "x.b32.ultralytics.engine")


def test_ultralytics_reads_the_header_and_skips_it(b32):
    from ultralytics.nn.backends.base import BaseBackend

    offset, meta = BaseBackend.engine_header(b32)
    assert b32.read_bytes()[offset:] == PAYLOAD
    assert BaseBackend.read_metadata(b32) == meta
    onnx_meta = BaseBackend.read_metadata(MODEL)  # ultralytics' own reading of the export's metadata_props
    assert {int(k): v for k, v in meta["names"].items()} == ast.literal_eval(onnx_meta["names"])
    assert (meta["stride"], meta["task"], meta["batch"], meta["imgsz"]) == (32, "detect", 32, [640, 640])
    assert meta["args"] == {"batch": 32, "dynamic": False, "quantize": 8, "nms": False} and not meta["end2end"]
    assert BaseBackend.engine_header(MINI / "annotations.json") == (0, {})  # no header: ultralytics' rule agrees


class FakeTensorRT(types.ModuleType):
    """TensorRT 10's Python API as far as ultralytics' TensorRTBackend calls it, for an engine as trtexec builds it
    from the dynamic yolo11n.onnx: input (-1, 3, -1, -1) and one profile of batches lo..hi at size x size. Like
    TensorRT, the context refuses a shape outside the profile; `run` (float32 NCHW -> output), if given, computes what
    the engine would write into the output binding from the input binding (both CPU memory here)."""

    def __init__(self, lo, hi, size, classes=80, run=None):
        super().__init__("tensorrt")
        self.__version__ = "10.9.0.34"
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks modules up
        self.loaded, self.runs = [], []
        trt = self
        anchors = sum((size // s) ** 2 for s in (8, 16, 32))

        class Logger:
            INFO = 1

            def __init__(self, level=None):
                pass

        class TensorIOMode:
            INPUT, OUTPUT = 0, 1

        class Context:
            shape = None

            def set_input_shape(self, name, shape):
                ok = lo <= shape[0] <= hi and tuple(shape[1:]) == (3, size, size)
                self.shape = tuple(shape) if ok else self.shape
                return ok

            def get_tensor_shape(self, name):
                return self.shape if name == "images" else (self.shape[0], 4 + classes, anchors)

            def execute_v2(self, pointers):
                trt.runs.append(self.shape)
                if run is not None:
                    x = np.ctypeslib.as_array((ctypes.c_float * math.prod(self.shape)).from_address(pointers[0]))
                    y = run(x.reshape(self.shape))
                    np.ctypeslib.as_array((ctypes.c_float * y.size).from_address(pointers[1]))[:] = y.ravel()
                return True

        class Engine:
            num_io_tensors = 2

            def create_execution_context(self):
                return Context()

            def get_tensor_name(self, i):
                return ("images", "output0")[i]

            def get_tensor_dtype(self, name):
                return "float32"

            def get_tensor_mode(self, name):
                return TensorIOMode.INPUT if name == "images" else TensorIOMode.OUTPUT

            def get_tensor_shape(self, name):
                return (-1, 3, -1, -1) if name == "images" else (-1, 4 + classes, -1)

            def get_tensor_profile_shape(self, name, index):
                return [(b, 3, size, size) for b in (lo, hi, hi)]

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                trt.loaded.append(bytes(data))
                return Engine()

        self.Logger, self.TensorIOMode, self.Runtime = Logger, TensorIOMode, Runtime
        self.nptype = lambda dtype: np.float32


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a FakeTensorRT(lo, hi, size); the backend keeps its tensors on the CPU (it moves them to cuda:0)."""
    import torch
    from ultralytics.nn.backends import tensorrt as backend

    cpu = torch.device("cpu")
    monkeypatch.setattr(backend, "torch", types.SimpleNamespace(
        device=lambda *a, **k: cpu, from_numpy=torch.from_numpy,
        cuda=types.SimpleNamespace(device=lambda d: contextlib.nullcontext())))

    def install(lo, hi, size=640, run=None):
        trt = FakeTensorRT(lo, hi, size, run=run)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt
    return install


def test_autobackend_loads_the_copy_and_pads_to_its_batch(b32, fake_trt):
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    trt = fake_trt(32, 32)
    model = AutoBackend(str(b32), device=torch.device("cpu"))
    assert trt.loaded == [PAYLOAD]  # what TensorRT is handed: the engine, not the header
    assert model.names == names_of(MODEL) and model.names[0] == "person"
    assert (model.stride, model.task, model.batch, model.imgsz) == (32, "detect", 32, [640, 640])
    assert model(torch.zeros(1, 3, 640, 640)).shape == (1, 84, 8400)  # one image, padded to the static batch
    assert model(torch.zeros(40, 3, 640, 640)).shape == (40, 84, 8400)  # 40, split into two batches of 32
    assert trt.runs == [(32, 3, 640, 640)] * 3


def test_a_dynamic_profile_takes_each_batch_as_it_comes(tmp_path, fake_trt):
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    trt = fake_trt(1, 8)
    path = write(PAYLOAD, metadata(MODEL, 8, True, 640, 16), tmp_path / "dyn.engine")
    model = AutoBackend(str(path), device=torch.device("cpu"))
    assert model(torch.zeros(3, 3, 640, 640)).shape == (3, 84, 8400) and trt.runs == [(3, 3, 640, 640)]


def test_predict_runs_with_rect_false_and_refuses_rectangles_without(b32, fake_trt):
    """trtexec's engine keeps the ONNX's dynamic height and width (its profile fixes them), so ultralytics calls it
    dynamic and letterboxes to the smallest rectangle unless told rect=False: README, 'For ultralytics users'."""
    from ultralytics import YOLO

    trt = fake_trt(32, 32)
    image = str(sorted((MINI / "images").iterdir())[0])  # 640x480 and the like: COCO images are not square
    model = YOLO(str(b32), task="detect")
    results = model.predict(image, rect=False, device="cpu", verbose=False)
    assert len(results) == 1 and results[0].names[0] == "person" and trt.runs == [(32, 3, 640, 640)]
    with pytest.raises(ValueError, match="outside the TensorRT optimization profile"):
        model.predict(image, device="cpu", verbose=False)


def test_through_ultralytics_the_copy_detects_what_the_onnx_model_does(tmp_path, fake_trt):
    """The stand-in engine computes with ONNX Runtime on yolo11n.onnx: ultralytics' TensorRT path over the copy (its
    header's names, size and batch) then gives the boxes ultralytics' own ONNX backend gives for the same model."""
    import onnxruntime as ort
    from ultralytics import YOLO

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    trt = fake_trt(1, 1, run=lambda x: session.run(None, {"images": x})[0])
    engine = write(PAYLOAD, metadata(MODEL, 1, False, 640, 16), tmp_path / "b1.ultralytics.engine")
    image = str(sorted((MINI / "images").iterdir())[0])
    ours = YOLO(str(engine), task="detect").predict(image, rect=False, device="cpu", verbose=False)[0]
    theirs = YOLO(str(MODEL), task="detect").predict(image, rect=False, device="cpu", verbose=False)[0]
    assert trt.runs == [(1, 3, 640, 640)] and len(ours.boxes) > 0
    assert ours.boxes.cls.tolist() == theirs.boxes.cls.tolist() and ours.names == theirs.names
    assert np.allclose(ours.boxes.xyxy.numpy(), theirs.boxes.xyxy.numpy(), atol=1e-3)


def yolo_dataset(folder):
    """coco-mini as an ultralytics dataset (images/val, labels/val with class cx cy w h, data.yaml)."""
    from tools.yolo.decode import COCO80_TO_91

    ann, to80 = json.loads((MINI / "annotations.json").read_text()), {c: i for i, c in enumerate(COCO80_TO_91)}
    images, rows = {i["id"]: i for i in ann["images"]}, {}
    for a in ann["annotations"]:
        im, (x, y, w, h) = images[a["image_id"]], a["bbox"]
        W, H = im["width"], im["height"]
        rows.setdefault(Path(im["file_name"]).stem, []).append(
            f"{to80[a['category_id']]} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}")
    for sub in ("images/val", "labels/val"):
        (folder / sub).mkdir(parents=True)
    for f in sorted((MINI / "images").iterdir()):
        (folder / "images/val" / f.name).symlink_to(f)
        (folder / "labels/val" / f"{f.stem}.txt").write_text("\n".join(rows.get(f.stem, [])))
    data = folder / "data.yaml"
    data.write_text(json.dumps({"path": str(folder), "train": "images/val", "val": "images/val",
                                "names": names_of(MODEL)}))
    return data


def test_val_runs_with_rect_false_padding_each_batch(b32, fake_trt, tmp_path):
    from ultralytics import YOLO

    trt = fake_trt(32, 32)
    data, model = yolo_dataset(tmp_path / "coco-mini"), YOLO(str(b32), task="detect")
    model.val(data=str(data), rect=False, batch=16, device="cpu", plots=False, verbose=False)
    assert trt.runs == [(32, 3, 640, 640)] * 2  # 32 images in batches of 16, each padded to the engine's 32
    with pytest.raises(ValueError, match="outside the TensorRT optimization profile"):
        model.val(data=str(data), batch=16, device="cpu", plots=False, verbose=False)


# ----------------------------------------------------------------------------------------------------------------
def test_engine_bytes_strips_a_header_and_leaves_a_plain_engine_alone(b32, tmp_path):
    plain = tmp_path / "plain.engine"
    plain.write_bytes(PAYLOAD)
    assert engine_bytes(b32) == PAYLOAD and engine_bytes(plain) == PAYLOAD
    assert read(plain) == ({}, PAYLOAD) and read(b32)[0]["batch"] == 32
    again = write(b32, {"task": "detect"}, tmp_path / "again.engine")  # a header is replaced, never stacked
    assert read(again) == ({"task": "detect"}, PAYLOAD)


def test_a_damaged_header_is_one_line_naming_the_file(b32, tmp_path):
    cut = tmp_path / "cut.engine"
    cut.write_bytes(b32.read_bytes()[:1000])  # the header's length now runs past the end of the file
    one_line_error(run_tool("tools.ultralytics_engine", str(cut)), str(cut), "truncated", "make ultralytics")
    bad = tmp_path / "bad.engine"
    bad.write_bytes((10).to_bytes(4, "little") + b"{not json}" + PAYLOAD)
    with pytest.raises(UserError, match=f"{bad}: .*not a JSON object"):
        engine_bytes(bad)


def test_the_cli_writes_what_ultralytics_reads(tmp_path):
    from ultralytics.nn.backends.base import BaseBackend

    plain, out = tmp_path / "e.engine", tmp_path / "e.ultralytics.engine"
    plain.write_bytes(PAYLOAD)
    res = run_tool("tools.ultralytics_engine", str(plain), "-o", str(out), "--onnx", str(MODEL), "--batch", "1",
                   "--quantize", "16")
    assert res.returncode == 0 and "rect=False" in res.stdout, res.stderr
    meta = BaseBackend.read_metadata(out)
    assert meta["batch"] == 1 and meta["args"]["quantize"] == 16 and len(meta["names"]) == 80
    assert json.loads(run_tool("tools.ultralytics_engine", str(out)).stdout)["engine_bytes"] == len(PAYLOAD)


# ----------------------------------------------------------------------------------------------------------------
def edited_model(tmp_path, edit):
    model = onnx.load(str(MODEL))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def test_only_float_input_raw_head_detectors_are_drop_ins(tmp_path):
    def uint8_input(m):
        m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8

    def nms_inside(m):
        dims = m.graph.output[0].type.tensor_type.shape.dim
        dims[1].dim_value, dims[2].dim_value = 300, 6

    with pytest.raises(UserError, match="feeds float32 images.*deploy option"):
        metadata(MODEL, 1, False, source_onnx=edited_model(tmp_path, uint8_input))
    with pytest.raises(UserError, match=r"not the raw head of 80 classes.*deploy option"):
        metadata(MODEL, 1, False, source_onnx=edited_model(tmp_path, nms_inside))
    with pytest.raises(UserError, match="has no ultralytics metadata.*make export"):
        metadata(edited_model(tmp_path, lambda m: m.metadata_props.clear()), 1, False)


def test_make_ultralytics_writes_the_copy_beside_the_recorded_engine(tmp_path):
    recipe, root, results = load(RECIPE), tmp_path / "checkout", tmp_path / "runs"
    layout = Layout(recipe.model, root, results)
    engine = layout.engines / "int8-qdq.b32.0123456789ab.engine"
    engine.parent.mkdir(parents=True)
    engine.write_bytes(PAYLOAD)
    rec = {"name": recipe.name, "key": "k", "level": recipe.builder_optimization_level, "precision": recipe.precision,
           "profile": {"name": "b32", "min": 32, "opt": 32, "max": 32, "static": True}, "recipe": to_dict(recipe),
           "onnx": str(MODEL), "build": {"engine": layout.rel(engine)}, "updated_utc": "2026-12-02T00:00:00Z"}
    layout.write_json(layout.points / "int8-qdq.b32.k.json", rec)
    written = from_records(RECIPE, results, ["b32"], root)
    assert written == [layout.engines / "int8-qdq.b32.0123456789ab.ultralytics.engine"]
    meta, payload = read(written[0])
    assert payload == PAYLOAD == engine.read_bytes() and meta["batch"] == 32 and meta["args"]["quantize"] == 8
    with pytest.raises(UserError, match=r"no engine of recipe 'int8-qdq' \[b1\].*make engine RECIPE="):
        from_records(RECIPE, results, ["b1"], root)
    with pytest.raises(UserError, match=r"int8-dfl-mse-e2e.yaml: an end-to-end recipe.*int8-dfl-mse.yaml"):
        from_records(REPO / "recipes/int8-dfl-mse-e2e.yaml", results, ["b1"], root)


def test_make_ultralytics_passes_its_knobs():
    res = subprocess.run(["make", "-s", "-n", f"PY={sys.executable}", "ultralytics", f"RECIPE={RECIPE}",
                          "PROFILES=b32", "RESULTS=out"], cwd=REPO, capture_output=True, text=True)
    assert f"-m tools.ultralytics_engine --model yolo11n --recipe {RECIPE}" in res.stdout, res.stderr
    assert '--results "out"' in res.stdout and "--profiles b32" in res.stdout
