"""Bad input, interrupts and crashes: one line naming the file and the fix, no traceback, no half-written results,
and the user's files left as they were."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CALIB, MINI, MODEL, REPO, run_tool, start_tool, tool_env

from tools.core.errors import UserError
from tools.core.files import sha256_file


def one_line_error(res, *words):
    """The tool refused with exit 2 and a single `error: ...` line that names each of `words`."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def flag_refused(res, flag):
    """argparse refused the value: usage, then one error line naming the flag."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"argument {flag}" in res.stderr.strip().splitlines()[-1], res.stderr


def eval_set(tmp_path, annotations, images=4) -> Path:
    """An EVAL_DIR-shaped folder: the first `images` shipped images and the given annotations object."""
    folder = tmp_path / "eval"
    (folder / "images").mkdir(parents=True)
    for p in sorted((MINI / "images").iterdir())[:images]:
        shutil.copy(p, folder / "images")
    (folder / "annotations.json").write_text(annotations if isinstance(annotations, str) else json.dumps(annotations))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# 1. ModelOpt works on a private copy of the model
def test_modelopt_never_touches_the_users_onnx(tmp_path):
    from tools.quantize import quantize
    from tools.core.recipe import load

    user = tmp_path / "mine" / "yolo11n.onnx"
    user.parent.mkdir()
    shutil.copy(MODEL, user)
    before = sha256_file(user), user.stat().st_mtime_ns
    root = tmp_path / "root"
    recipe = load(REPO / "recipes/int8-qdq.yaml").replace(calib_images=4, onnx=str(user))
    out = quantize(recipe, "8.6", CALIB, root=root)
    assert (sha256_file(user), user.stat().st_mtime_ns) == before  # not even rewritten with the same bytes
    assert sorted(os.listdir(user.parent)) == ["yolo11n.onnx"]  # no ModelOpt intermediates beside it either
    logs = sorted((root / "logs" / "yolo11n").glob("*.log"))
    assert len(logs) == 2  # calibrate and quantize
    for log in logs:
        cmd = log.read_text().splitlines()[0].split()
        given = Path(cmd[cmd.index("--onnx_path") + 1])
        assert given != user and given.name == user.name and not given.exists()  # a copy, cleaned up
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no scratch folder left
    meta = json.loads(out.with_suffix(".json").read_text())
    assert f"--onnx_path {user} " in meta["command"]  # the record names the user's model, not the copy
    assert f"--output_path {out.relative_to(root)} " in meta["command"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_during_modelopt_leaves_the_model_alone(tmp_path):
    """The incident: one SIGTERM while ModelOpt ran left the committed model at 0 bytes."""
    user = tmp_path / "yolo11n.onnx"
    shutil.copy(MODEL, user)
    before = sha256_file(user), user.stat().st_mtime_ns
    root = tmp_path / "root"
    quantize_run = (f"from pathlib import Path; from tools.core.errors import run_main; from tools.quantize import quantize; "
                    f"from tools.core.recipe import load; run_main(lambda argv: quantize(load({str(REPO / 'recipes/int8-qdq.yaml')!r})"
                    f".replace(calib_images=4, onnx={str(user)!r}), '8.6', {str(CALIB)!r}, root=Path({str(root)!r})))")
    proc = subprocess.Popen([sys.executable, "-c", quantize_run], cwd=REPO, env=tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    logs = root / "logs" / "yolo11n"
    modelopt = []
    try:
        deadline = time.monotonic() + 120
        # ModelOpt logs this line, then rewrites the model it was given in place (onnx.shape_inference)
        while proc.poll() is None and time.monotonic() < deadline and not any(
                "Preprocessing the model" in f.read_text() for f in (logs.iterdir() if logs.is_dir() else [])):
            time.sleep(0.05)
        modelopt = _children(proc.pid)
        assert modelopt, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        for pid in [proc.pid, *modelopt]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 143 and stderr.strip() == "interrupted", stderr
    assert not any(map(_running, modelopt))  # ModelOpt stopped with it
    assert (sha256_file(user), user.stat().st_mtime_ns) == before
    assert not [p for p in tmp_path.rglob(".*")]  # no scratch copy, no half-written output


def test_damaged_calibration_tensor_named_before_modelopt(tmp_path):
    from tools.quantize import calibration_name, quantize
    from tools.core.recipe import load

    root = tmp_path / "root"
    recipe = load(REPO / "recipes/int8-qdq.yaml").replace(calib_images=4)
    npy = calibration_name(recipe, CALIB, root)
    npy.parent.mkdir(parents=True)
    np.save(npy, np.zeros((4, 3, 640, 640), np.float32))
    npy.write_bytes(npy.read_bytes()[:4096])  # truncated, as by a full disk
    with pytest.raises(UserError, match=f"{npy.name}: not a readable .npy.*delete it"):
        quantize(recipe, "8.6", CALIB, root=root)
    np.save(npy, np.zeros((4, 3, 320, 320), np.float32))
    with pytest.raises(UserError, match="not a float32 N x 3 x 640 x 640"):
        quantize(recipe, "8.6", CALIB, root=root)
    assert not (root / "logs").exists()  # ModelOpt never ran


@pytest.mark.parametrize("content, words", [(b"", "holds no ONNX graph"), (b"not a model\n", "not a readable ONNX")])
def test_quantize_refuses_what_is_no_model(tmp_path, content, words):
    """A 0-byte model is what an interrupted in-place rewrite used to leave behind."""
    from tools.quantize import quantize
    from tools.core.recipe import load

    model = tmp_path / "yolo11n.onnx"
    model.write_bytes(content)
    recipe = load(REPO / "recipes/int8-qdq.yaml").replace(calib_images=2, onnx=str(model))
    with pytest.raises(UserError, match=f"{model}: {words}"):
        quantize(recipe, "8.6", CALIB, root=tmp_path / "root")
    assert not (tmp_path / "root" / "logs").exists()  # ModelOpt never ran


def test_missing_model_names_real_knobs(tmp_path):
    from tools.quantize import model_digest

    with pytest.raises(UserError) as e:
        model_digest(tmp_path / "yolo11s.onnx")
    assert "MODEL_ONNX" not in str(e.value) and "ONNX=" in str(e.value) and "onnx:" in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# 2. Interrupts
def _stat(pid) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, ...); [] once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _stat(d.name)[1:2] == [str(pid)]]


def _copies_of_mini(folder: Path, copies: int) -> Path:
    """An evaluation folder holding `copies` copies of coco-mini (images linked, ids and annotations renumbered)."""
    gt = json.loads((MINI / "annotations.json").read_text())
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for k in range(copies):
        new_id = {im["id"]: k * 10**9 + im["id"] for im in gt["images"]}
        for im in gt["images"]:
            name = f"{new_id[im['id']]:012d}.jpg"
            (folder / "images" / name).symlink_to(MINI / "images" / im["file_name"])
            images.append({**im, "id": new_id[im["id"]], "file_name": name})
        annotations += [{**a, "id": k * 10**9 + a["id"], "image_id": new_id[a["image_id"]]} for a in gt["annotations"]]
    (folder / "annotations.json").write_text(json.dumps({**gt, "images": images, "annotations": annotations}))
    return folder


def _running(pid: int) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig, whom, code", [(signal.SIGINT, "group", 130), (signal.SIGTERM, "group", 143),
                                             (signal.SIGTERM, "tool", 143)])
def test_interrupted_evaluation_ends_cleanly(tmp_path, sig, whom, code):
    """Ctrl-C (SIGINT to the terminal's process group), `timeout` (SIGTERM to the group) and `kill PID`: one line,
    exit 128 + signal, no output file, the pool's workers gone."""
    # ten copies of the 32 images at 1280 pixels: over a minute on 2 cores, so the signal below lands while the pool
    # is predicting however fast the machine is
    images = _copies_of_mini(tmp_path / "images10", 10)
    out = tmp_path / "run" / "OUT.json"
    out.parent.mkdir()
    # batch 1: ONNX Runtime finishes the run it is in before Python sees the signal, so keep each run short
    proc = start_tool("tools.evaluate", str(MODEL), "--images", str(images), "--batch", "1", "--workers", "2",
                      "--imgsz", "1280", "-o", str(out))
    workers = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = _children(proc.pid)
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(3)  # the model loads, then predicting starts
        assert proc.poll() is None
        os.killpg(proc.pid, sig) if whom == "group" else proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        for pid in [proc.pid, *workers]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == code, stderr
    assert stderr.strip() == "interrupted"
    assert not out.exists() and not list(out.parent.iterdir())
    assert len(workers) == 2 and not any(map(_running, workers))


# ----------------------------------------------------------------------------------------------------------------
# 3. Counts and sizes are checked where they are typed
@pytest.mark.parametrize("args, flag", [
    (["tools.calib", str(CALIB), "-o", "X.npy", "-n", "0"], "-n/--count"),
    (["tools.calib", str(CALIB), "-o", "X.npy", "-n", "-3"], "-n/--count"),
    (["tools.calib", str(CALIB), "-o", "X.npy", "-n", "2", "--seed", "-1"], "--seed"),
    (["tools.calib", str(CALIB), "-o", "X.npy", "-n", "2", "--imgsz", "0"], "--imgsz"),
    (["tools.evaluate", str(MODEL), "--images", str(MINI), "--batch", "0"], "--batch"),
    (["tools.evaluate", str(MODEL), "--images", str(MINI), "--batch", "-1"], "--batch"),
    (["tools.evaluate", str(MODEL), "--images", str(MINI), "--limit", "0"], "--limit"),
    (["tools.evaluate", str(MODEL), "--images", str(MINI), "--limit", "-2"], "--limit"),
    (["tools.evaluate", str(MODEL), "--images", str(MINI), "--workers", "-1"], "--workers"),
    (["tools.evaluate", str(MODEL), "--images", str(MINI), "--imgsz", "100"], "--imgsz"),
    (["tools.evaluate", str(MODEL), "--images", str(MINI), "--batch", "two"], "--batch"),
    (["tools.compare", "E.engine", "--onnx", str(MODEL), "--images", str(MINI), "-n", "0"], "-n/--count"),
])
def test_bad_counts_refused_naming_the_flag(tmp_path, args, flag):
    flag_refused(run_tool(*args, cwd=tmp_path), flag)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# 4. compare checks its inputs before writing tens of MB
def test_compare_without_engine_writes_nothing(tmp_path):
    work = tmp_path / "work"
    res = run_tool("tools.compare", str(tmp_path / "none.engine"), "--onnx", str(MODEL), "--images", str(MINI),
                   "--work-dir", str(work))
    one_line_error(res, "none.engine", "no such engine", "make engine")
    assert not work.exists()
    engine = tmp_path / "some.engine"
    engine.write_bytes(b"x")
    res = run_tool("tools.compare", str(engine), "--onnx", str(tmp_path / "none.onnx"), "--images", str(MINI),
                   "--work-dir", str(work))
    one_line_error(res, "none.onnx", "--onnx")
    assert not work.exists()


def test_compare_with_missing_polygraphy_command(tmp_path):
    engine = tmp_path / "some.engine"
    engine.write_bytes(b"x")
    res = run_tool("tools.compare", str(engine), "--onnx", str(MODEL), "--images", str(MINI), "-n", "1",
                   "--work-dir", str(tmp_path / "work"), "--polygraphy", "no-such-polygraphy")
    one_line_error(res, "no-such-polygraphy", "--polygraphy", "POLYGRAPHY=")


# ----------------------------------------------------------------------------------------------------------------
# 5. Every flag and make knob a message names exists
OWNED = ["tools/evaluate.py", "tools/calib.py", "tools/compare.py", "tools/core/files.py", "tools/quantize.py",
         "tools/ultralytics_engine.py", "tools/polygraphy_inspect.py"]


def test_messages_name_only_real_flags_and_knobs():
    import re

    makefile = (REPO / "Makefile").read_text()
    knobs = set(re.findall(r"^([A-Z_]+)\s*\?=", makefile, re.M))
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    flags = {f for p in (REPO / "tools").rglob("*.py")
             for f in re.findall(r"add_argument\([^)]*?\"(--[a-z][a-z0-9-]*)\"", p.read_text())}
    for name in OWNED:
        text = (REPO / name).read_text()
        messages = re.findall(r"UserError\((f?\".*?\"(?:\s*f?\".*?\")*)\)", text, re.S)
        assert messages, name
        for m in messages:
            for knob in re.findall(r"\b([A-Z][A-Z_]{2,})=", m):
                assert knob in knobs, f"{name}: {knob}= is no Makefile knob"
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m):
                assert flag in flags, f"{name}: {flag} is no flag of any tool"
            for target in re.findall(r"\bmake ([a-z-]+)", m):
                assert target in targets, f"{name}: make {target} is no Makefile target"


def test_missing_annotations_say_where_they_go(tmp_path):
    folder = tmp_path / "eval"
    shutil.copytree(MINI / "images", folder / "images")
    line = one_line_error(run_tool("tools.evaluate", str(MODEL), "--images", str(folder)),
                          str(folder / "annotations.json"), "--annotations", "EVAL_DIR")
    assert "python -m tools.evaluate" in line
    shutil.copy(MINI / "annotations.json", folder)
    from tools.evaluate import load_ground_truth

    _, files, _ = load_ground_truth(folder / "images")  # the images/ folder itself: annotations in its parent
    assert len(files) == 32


# ----------------------------------------------------------------------------------------------------------------
# 6. engine and bench run alone find the same trtexec as the pipeline
def test_engine_defaults_to_the_fallback_without_trtexec(tmp_path):
    res = run_tool("tools.engine", str(REPO / "recipes/fp16.yaml"), "--onnx", str(MODEL), "-o",
                   str(tmp_path / "e.engine"), "--log", str(tmp_path / "e.log"), "--trt", "8.6", "--print-only",
                   PATH=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{sys.executable} -m tools.trtexec_py --onnx=")


def test_bench_defaults_to_the_fallback_without_trtexec(tmp_path):
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"x")
    res = run_tool("tools.bench", str(engine), "--batches", "1", "--no-graphs", "--duration", "0.1",
                   "--log-prefix", str(tmp_path / "b"), PATH=str(tmp_path))
    assert "Traceback" not in res.stderr and "No such file or directory: 'trtexec'" not in res.stderr
    log = tmp_path / "b.bench-b1.log"
    assert log.read_text().startswith(f"# {sys.executable} -m tools.trtexec_py --loadEngine=")


# ----------------------------------------------------------------------------------------------------------------
# 7. Annotations and image folders
def _coco():
    return json.loads((MINI / "annotations.json").read_text())


def _broken(change):
    d = _coco()
    change(d)
    return d


@pytest.mark.parametrize("annotations, words", [
    ("hello", ["not JSON"]),
    ([1, 2, 3], ["not a COCO instances file"]),
    (_broken(lambda d: d.pop("categories")), ["not a COCO instances file", "'categories'"]),
    (_broken(lambda d: d.pop("annotations")), ["not a COCO instances file"]),
    (_broken(lambda d: d.__setitem__("annotations", [])), ["holds no annotations"]),
    (_broken(lambda d: d["images"][0].pop("id")), ["images[0] has no integer id"]),
    (_broken(lambda d: d["annotations"][0].pop("id")), ["annotations[0] has no integer id"]),
    (_broken(lambda d: d["annotations"][0].pop("image_id")), ["annotations[0] has image_id None"]),
    (_broken(lambda d: d["annotations"][0].__setitem__("category_id", "x")), ["annotations[0] has category_id 'x'"]),
    (_broken(lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3])), ["annotations[0] has bbox [1, 2, 3]"]),
    (_broken(lambda d: d["annotations"][0].__setitem__("bbox", ["a", "b", "c", "d"])), ["bbox ['a'"]),
    (_broken(lambda d: d["annotations"][0].__setitem__("bbox", None)), ["bbox None"]),
    (_broken(lambda d: d["annotations"][0].pop("bbox")), ["bbox None"]),
    (_broken(lambda d: d["annotations"][0].__setitem__("bbox", [0, 0, -5, 10])), ["width and height >= 0"]),
])
def test_malformed_annotations_one_line(tmp_path, annotations, words):
    folder = eval_set(tmp_path, annotations)
    one_line_error(run_tool("tools.evaluate", str(MODEL), "--images", str(folder)),
                   str(folder / "annotations.json"), *words)


def test_folder_without_images_one_line(tmp_path):
    folder = eval_set(tmp_path, _coco(), images=0)
    one_line_error(run_tool("tools.evaluate", str(MODEL), "--images", str(folder)), "holds no .jpg/.png images")
    one_line_error(run_tool("tools.evaluate", str(MODEL), "--images", str(tmp_path / "none")), "no such image folder")


def test_exact_ids_must_be_ids(tmp_path):
    folder = eval_set(tmp_path, _coco())
    (folder / "exact_ids.txt").write_text("139\n285,632\n")
    one_line_error(run_tool("tools.evaluate", str(MODEL), "--images", str(folder)), "exact_ids.txt", "'285,632'")


# ----------------------------------------------------------------------------------------------------------------
# Other bad input found by trying
def test_not_a_detector_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 640, 640])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 640, 640])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, tmp_path / "identity.onnx")
    one_line_error(run_tool("tools.evaluate", str(tmp_path / "identity.onnx"), "--images", str(MINI), "--limit", "2"),
                   "identity.onnx", "not a COCO YOLO detector")
    one_line_error(run_tool("tools.evaluate", str(tmp_path / "none.onnx"), "--images", str(MINI)),
                   "none.onnx: no such model")
    (tmp_path / "text.onnx").write_text("not a model\n")
    one_line_error(run_tool("tools.evaluate", str(tmp_path / "text.onnx"), "--images", str(MINI), "--limit", "2"),
                   "text.onnx", "cannot load it")
    # a model newer than this ONNX Runtime: the line names the cause, not ONNX Runtime's source file and C++ signature
    model.ir_version = 99
    onnx.save(model, tmp_path / "future.onnx")
    res = run_tool("tools.evaluate", str(tmp_path / "future.onnx"), "--images", str(MINI), "--limit", "2")
    one_line_error(res, "future.onnx", "cannot load it", "IR version")
    assert "onnxruntime_src" not in res.stderr


def test_output_path_that_is_a_folder(tmp_path):
    one_line_error(run_tool("tools.calib", str(CALIB), "-o", str(tmp_path), "-n", "1"), str(tmp_path), "is a folder")
    (tmp_path / "file").write_text("")
    one_line_error(run_tool("tools.calib", str(CALIB), "-o", str(tmp_path / "file" / "x.npy"), "-n", "1"),
                   "cannot be written (File exists: " + str(tmp_path / "file"))


def test_calibration_tensor_checked(tmp_path):
    from tools.calib import check_calibration

    npy = tmp_path / "x.npy"
    npy.write_text("garbage")
    with pytest.raises(UserError, match="x.npy: not a readable .npy"):
        check_calibration(npy, 640)
    np.save(npy, np.zeros((2, 640, 640, 3), np.float32))  # NHWC
    with pytest.raises(UserError, match=r"float32 \(2, 640, 640, 3\)"):
        check_calibration(npy, 640)
    with open(npy, "wb") as f:
        np.savez(f, images=np.zeros((2, 3, 640, 640), np.float32))
    with pytest.raises(UserError, match="holds an .npz archive"):
        check_calibration(npy, 640)
    np.save(npy, np.zeros((2, 3, 640, 640), np.float32))
    check_calibration(npy, 640)
