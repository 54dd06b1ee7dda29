"""Command lines: argparse types that refuse bad numbers by name, and the flags several verbs share."""
from __future__ import annotations

import argparse
import math
import shutil
import sys

from tools.core.files import REPO
from tools.core.layout import RUNS

DEFAULT_TRT = "10"  # the TensorRT to plan for where none is installed to ask: what a user most likely runs


def _int_at_least(text: str, least: int) -> int:
    # ArgumentTypeError (not ValueError) makes argparse print our reason, after the flag's name
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {least} or more, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts and sizes."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type for seeds."""
    return _int_at_least(text, 0)


def builder_level(text: str) -> int:
    """argparse type for TensorRT's builder optimization level (0-5, the range the recipe schema takes)."""
    value = _int_at_least(text, 0)
    if value > 5:
        raise argparse.ArgumentTypeError(f"{text}: builder optimization levels are 0 to 5")
    return value


def _finite(text: str) -> float:
    # float() takes "nan" and "inf": a budget of nan mAP points compares false with everything
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def positive_number(text: str) -> float:
    """argparse type for durations and other amounts above zero."""
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def non_negative_number(text: str) -> float:
    """argparse type for budgets and tolerances: finite, 0 or more."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def image_size(text: str) -> int:
    """argparse type for --imgsz: YOLO's strides need a multiple of 32."""
    value = positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (YOLO's largest stride), not {value}")
    return value


def default_trtexec() -> tuple[str, ...]:
    """NVIDIA's trtexec where it is on PATH, else our fallback that takes the same flags."""
    return ("trtexec",) if shutil.which("trtexec") else (sys.executable, "-m", "tools.trtexec_py")


def detect_version() -> str:
    """The installed TensorRT's version, else DEFAULT_TRT (quantizing on a machine without TensorRT)."""
    try:
        import tensorrt  # optional: only the GPU side has TensorRT

        return tensorrt.__version__
    except ImportError:
        return DEFAULT_TRT


# ----------------------------------------------------------------------------------------------------------------
# The flags several verbs share, each spelled once here (tests/test_cli.py checks that every verb takes them from here)
def add_results(ap: argparse.ArgumentParser, overwrite: bool = True) -> None:
    """--results (where records and tables go) and, for verbs that write results, --overwrite."""
    ap.add_argument("--results", default=str(RUNS),
                    help="results root: records and tables under <results>/<model>/ (default: runs/; results/ is the "
                         "committed set)")
    if overwrite:
        add_overwrite(ap)


def add_overwrite(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--overwrite", action="store_true", help="replace committed (git-tracked) result files")


def add_trt(ap: argparse.ArgumentParser) -> None:
    """--trt: the TensorRT a plan is made for; None means detect_version()'s answer, resolved where it is used."""
    ap.add_argument("--trt", help=f"TensorRT version to plan for (default: the installed one, else {DEFAULT_TRT})")


def add_trtexec(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--trtexec", help="trtexec command (default: trtexec if on PATH, else python -m tools.trtexec_py)")


def add_polygraphy(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--polygraphy",
                    help="polygraphy command (default: polygraphy, else python -m tools.polygraphy_cli)")


def add_imgsz(ap: argparse.ArgumentParser, help: str = "square input size") -> None:
    ap.add_argument("--imgsz", type=image_size, default=640, help=f"{help} (a multiple of 32; default: 640)")


def add_timing(ap: argparse.ArgumentParser) -> None:
    """The timing protocol of one (batch, CUDA graph) run."""
    ap.add_argument("--warmup-ms", type=positive_int, default=500, help="warm-up before timing, ms (default: 500)")
    ap.add_argument("--duration", type=positive_number, default=3.0,
                    help="seconds timed per (batch, CUDA graph) run (default: 3)")


def add_calib_dir(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--calib-dir", default=str(REPO / "calib" / "images"),
                    help="calibration images, never evaluation images (default: calib/images)")


def add_eval_dir(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--eval-dir", default=str(REPO / "data" / "coco-mini"),
                    help="evaluation images/ + annotations.json (+ exact_ids.txt); calibration images are checked "
                         "against it (default: data/coco-mini)")


def add_calib_images(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--calib-images", type=positive_int,
                    help="cap every recipe's calib_images (e.g. for a small folder); names follow the capped count")


def add_data(ap: argparse.ArgumentParser) -> None:
    """Calibration and evaluation images: every verb that calibrates checks that the two sets are disjoint."""
    add_calib_dir(ap)
    add_eval_dir(ap)
    add_calib_images(ap)


def add_level(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--level", type=builder_level,
                    help="build every recipe at this builder optimization level (0-5; default: each recipe's own)")


def add_model(ap: argparse.ArgumentParser) -> None:
    """--model, for verbs that take recipe files: a recipe file fits every size unless it names one (make's MODEL=)."""
    ap.add_argument("--model", help="the model (models/yolo11/MODEL.onnx) of recipes that name none, as make's MODEL= "
                                    "(default: the recipe's own `model:`, else yolo11n)")


def add_profiles(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--profiles", help="comma-separated deployment profiles (default: each recipe's all)")
