"""The record layer: content keys (images, annotations, model bytes), the newest-record rule, and committed files
that are never overwritten by accident."""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import MINI, REPO

from tools.core.errors import UserError
from tools.core.files import eval_set, file_digest
from tools.core.layout import Layout, is_tracked
from tools.core.record import Record, newest


@pytest.fixture()
def mini_copy(tmp_path):
    dst = tmp_path / "eval"
    shutil.copytree(MINI, dst)
    return dst


def test_eval_key_follows_content_not_path(mini_copy, tmp_path):
    a, b = eval_set(MINI), eval_set(mini_copy)
    assert a["key"] == b["key"] and a["count"] == 32  # same content elsewhere: same key
    ann = mini_copy / "annotations.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"][0] += 40  # one shifted box
    ann.write_text(json.dumps(data))
    assert eval_set(mini_copy)["key"] != a["key"]
    first = sorted((mini_copy / "images").iterdir())[0]
    assert eval_set(mini_copy, 4)["key"] != eval_set(mini_copy, 5)["key"] != eval_set(mini_copy)["key"]
    first.write_bytes(first.read_bytes() + b"\0")  # same name, other bytes
    assert eval_set(mini_copy, 4)["images"] != eval_set(MINI, 4)["images"]


def test_file_digest_sees_a_rewritten_file(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"one")
    d1 = file_digest(f)
    f.write_bytes(b"two!")
    assert file_digest(f) != d1
    with pytest.raises(UserError, match="no such file"):
        file_digest(tmp_path / "missing")


def test_committed_results_are_not_overwritten_without_the_flag(tmp_path):
    tracked = REPO / "results" / "yolo11n" / "sweep.json"
    assert is_tracked(tracked)
    layout = Layout("yolo11n", REPO, REPO / "results")
    with pytest.raises(UserError, match="committed result.*OVERWRITE=1"):
        layout.guard(tracked)
    assert Layout("yolo11n", REPO, REPO / "results", overwrite=True).guard(tracked) == tracked
    assert not is_tracked(tmp_path / "x.json")
    Layout("yolo11n", tmp_path, tmp_path).write_json(tmp_path / "x.json", {"a": 1})  # a new file is fine
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_make_clean_keeps_committed_calibration_caches(tmp_path):
    """`make clean` removes only what runs make: a clone's committed caches survive, generated files go."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)], check=True)
    for name in ("Makefile", ".gitignore"):  # this checkout's rules and tools, committed or not yet
        shutil.copy(REPO / name, clone / name)
    shutil.copytree(REPO / "tools", clone / "tools", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    caches = sorted(p.name for p in (clone / "calib" / "yolo11n").glob("*.cache"))
    assert caches
    (clone / "calib" / "yolo11n" / "640-n4-s0-x.npy").write_bytes(b"generated")
    (clone / "engines" / "yolo11n").mkdir(parents=True)
    (clone / "engines" / "yolo11n" / "a.engine").write_bytes(b"generated")
    subprocess.run(["make", "-s", "clean", f"PY={sys.executable}"], cwd=clone, check=True)
    assert sorted(p.name for p in (clone / "calib" / "yolo11n").glob("*")) == caches
    assert not (clone / "engines" / "yolo11n").exists()


def test_newest_is_the_latest_update_then_key():
    old = {"key": "b", "measured_utc": {"engine": "2026-01-01T00:00:00Z", "accuracy": "2026-01-02T00:00:00Z"}}
    new = {"key": "a", "updated_utc": "2026-02-01T00:00:00Z"}
    assert newest([old, new]) is new and newest([]) is None
    twin = {"key": "c", "updated_utc": "2026-02-01T00:00:00Z"}
    assert newest([new, twin]) is twin


def test_record_save_is_atomic_and_stamped(tmp_path):
    rec = Record.open(tmp_path / "points" / "r.json", lambda: {"name": "x"})
    rec.data["build"] = {"engine": "e"}
    rec.save(Layout("yolo11n", tmp_path, tmp_path))
    again = Record.open(tmp_path / "points" / "r.json", lambda: pytest.fail("a record on disk is read, not made"))
    assert again.data["build"] == {"engine": "e"} and again.data["updated_utc"]
    assert not list((tmp_path / "points").glob("*.tmp*"))


def test_committed_records_hold_what_the_record_schema_says():
    """tools/core/record.py's PointRecord is the record's one schema: every committed record has its identity fields,
    and no record or stage part holds a field the schema does not name (a stage writing a new one changes it)."""
    from typing import get_type_hints

    from tools.core.record import IDENTITY, PARTS, PointRecord

    fields = get_type_hints(PointRecord)
    paths = sorted(REPO.glob("results/*/points/*.json")) + sorted(REPO.glob("results/*/experiments/*/points/*.json"))
    assert len(paths) > 20
    seen = set()
    for path in paths:
        rec = json.loads(path.read_text())
        assert set(IDENTITY) <= set(rec) <= set(fields), path
        for part, schema in PARTS.items():
            for value in (rec[part] if isinstance(rec.get(part), list) else [rec[part]] if part in rec else []):
                assert set(value) <= set(get_type_hints(schema)), f"{path}: {part}"
                seen.add(part)
    assert seen == set(PARTS)  # every part was checked on a real record
