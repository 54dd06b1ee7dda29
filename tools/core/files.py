"""Files and hashing: atomic writes (a result is whole or absent), image folders, content digests, logged commands.

Keys hash content, never paths: a file's bytes (computed once per size and mtime in a process), a list of images'
names and bytes, the evaluation set (images, annotations, exact-annotation ids).
"""
from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tools.core.errors import UserError

REPO = Path(__file__).resolve().parent.parent.parent
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # the disk, not the caller, is the problem


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; pass a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror}: {e.filename}); pass a path in a writable "
                        f"folder") from None
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results unreadable to other users
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        short = e.errno is None and "written" in str(e)  # numpy's tofile reports a short write without an errno
        if e.errno not in FULL and not short:
            raise
        raise UserError(f"{path}: cannot be written ({str(e) if short else os.strerror(e.errno)}); free space there "
                        f"or pass a path on another disk (nothing was written)") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds. Otherwise nothing is
    left: neither the temporary folder nor the parent folders made for it."""
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise UserError(f"{path}: cannot be written ({e.strerror}: {e.filename}); pass a writable folder") from None
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make results unreadable to other users
    done = False
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made if not done else ():
            with contextlib.suppress(OSError):
                parent.rmdir()


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_images(folder) -> list[Path]:
    """Sorted image files of `folder` (or of `folder/images`); a clear error when there are none."""
    folder = Path(folder)
    if (folder / "images").is_dir():
        folder = folder / "images"
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder; pass a folder of .jpg/.png images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: holds no .jpg/.png images; pass a folder of images")
    return files


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_digest(path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in a process."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


def images_digest(files) -> str:
    """One digest for a list of images: their names and bytes, in order."""
    return digest([[Path(p).name, file_digest(p)] for p in files])


def eval_set(eval_dir, limit: int | None = None) -> dict:
    """What an accuracy number depends on besides the model: the images scored, the annotations and the list of
    exact-annotation ids; `key` hashes all of it."""
    eval_dir = Path(eval_dir)
    files = list_images(eval_dir)
    files = files[:limit] if limit else files
    annotations = eval_dir / "annotations.json"
    if not annotations.is_file():
        raise UserError(f"{annotations}: no COCO annotations; EVAL_DIR must hold images/ and annotations.json")
    exact = eval_dir / "exact_ids.txt"
    parts = {"images": images_digest(files), "count": len(files),
             "annotations": file_digest(annotations), "exact_ids": file_digest(exact) if exact.is_file() else None}
    return {**parts, "key": digest(parts)}


def run_logged(cmd: list[str], log_path, env: dict | None = None) -> tuple[int, float]:
    """Run `cmd` with its output into `log_path` (renamed into place even on failure: the log says why); `env`
    adds variables (e.g. CUDA_VISIBLE_DEVICES) to this process's environment."""
    t0 = time.perf_counter()
    with atomic_path(log_path) as tmp, open(tmp, "w") as log:
        log.write(f"# {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **env} if env else None).returncode
    return rc, time.perf_counter() - t0


def to_csv(rows: list[dict]) -> str:
    """Rows as CSV text, the columns in the order they first appear."""
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
