"""Images -> calibration tensor (.npy, N x 3 x S x S float32) with exactly the preprocessing inference uses.

Refuses any calibration image that is also an evaluation image (same bytes), and writes a JSON sidecar with the
file list, seed and checksums so a calibration set can be reproduced and audited.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tools.core.cli import add_eval_dir, add_imgsz, non_negative_int, positive_int
from tools.core.errors import UserError, run_main
from tools.core.files import atomic_path, file_digest, list_images, sha256_file, write_json
from tools.yolo.preprocess import preprocess, to_input


def select_images(files: list[Path], count: int, seed: int) -> list[Path]:
    """Draw `count` of the sorted files with default_rng(seed) (as ModelOpt's image_prep does), kept in file order."""
    if count > len(files):
        raise UserError(f"{files[0].parent}: holds {len(files)} images but {count} were asked for; "
                        f"lower calib_images in the recipe or pass a larger folder")
    picked = np.random.default_rng(seed).choice(len(files), size=count, replace=False)
    return [files[i] for i in sorted(picked)]


def check_disjoint(calib_files: list[Path], eval_dir) -> None:
    """Calibrating on evaluation images inflates every accuracy number: refuse any byte-identical overlap."""
    if eval_dir is None:
        return
    # digests cached per file: every run checks, not only the first
    eval_hashes = {file_digest(p): p for p in list_images(eval_dir)}
    for p in calib_files:
        h = file_digest(p)
        if h in eval_hashes:
            raise UserError(f"{p}: is the same image as evaluation image {eval_hashes[h]}; "
                            f"remove it from the calibration folder (calibration and evaluation sets must not overlap)")


def build_calibration(image_dir, out, count: int, seed: int = 0, size: int = 640, eval_dir=None) -> dict:
    files = select_images(list_images(image_dir), count, seed)
    check_disjoint(files, eval_dir)
    batch = np.stack([preprocess(p, size)[0] for p in files])
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, to_input(batch))
    info = {"images": [p.name for p in files], "image_dir": str(image_dir), "count": count, "seed": seed,
            "imgsz": size, "sha256": [sha256_file(p) for p in files],
            "preprocessing": "ultralytics val letterbox (scaleup=False, centre, pad 114), RGB, CHW, /255, float32",
            "eval_dir_checked": str(eval_dir) if eval_dir else None}
    write_json(Path(out).with_suffix(".json"), info)
    return info


def check_calibration(npy, imgsz: int) -> None:
    """A damaged or foreign tensor fails deep inside ModelOpt (or calibrates on the wrong input): name it instead.
    Reads only the header (memory-mapped)."""
    try:
        x = np.load(npy, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        reason = str(e).split(". ")[0]
        raise UserError(f"{npy}: not a readable .npy ({reason}); delete it and run again to rebuild it") from None
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4 and x.shape[1:] == (3, imgsz, imgsz)
            and len(x)):
        found = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else "an .npz archive"
        raise UserError(f"{npy}: holds {found}, not a float32 N x 3 x {imgsz} x {imgsz} calibration tensor; delete "
                        f"it and run again to rebuild it")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.calib", description=__doc__)
    ap.add_argument("images", help="folder of calibration images (never evaluation images)")
    ap.add_argument("-o", "--output", required=True, help="output .npy (a .json sidecar is written beside it)")
    ap.add_argument("-n", "--count", type=positive_int, required=True, help="number of images to draw")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    add_imgsz(ap)
    add_eval_dir(ap)
    args = ap.parse_args(argv)
    info = build_calibration(args.images, args.output, args.count, args.seed, args.imgsz, args.eval_dir)
    print(f"wrote {args.output}: {info['count']} images from {args.images}")


if __name__ == "__main__":
    run_main(main)
