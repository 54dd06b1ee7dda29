"""Command lines: argparse types that refuse bad numbers by name, and the flags several verbs share."""
from __future__ import annotations

import argparse
import math
import shutil
import sys

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
