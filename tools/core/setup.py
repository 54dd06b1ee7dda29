"""What a run takes besides its recipes (data, tools, timing protocol, where results go), the flags that give it, and
the flags that give it back (how a sweep hands its setup to each job).
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tools.core.cli import add_data, add_level, add_polygraphy, add_profiles, add_results, add_timing, add_trt, \
    add_trtexec, default_trtexec, detect_version, non_negative_int, positive_int
from tools.core.errors import UserError
from tools.core.files import REPO
from tools.core.layout import RUNS, Layout
from tools.core.recipe import Recipe

GRAPH_MODES = {"both": (False, True), "on": (True,), "off": (False,)}


@dataclass(frozen=True)
class Setup:
    """Everything a run takes besides the recipes: data, tools, timing protocol and where results go."""
    calib_dir: Path
    eval_dir: Path
    root: Path = REPO
    results: Path = RUNS
    overwrite: bool = False
    onnx: Path | None = None  # the model to start from instead of the recipe's (Makefile ONNX=)
    profiles: tuple[str, ...] | None = None  # only these deployment profiles (default: every one of the recipe)
    level: int | None = None  # every recipe's builder_optimization_level for this run (default: the recipe's own)
    trt_version: str | None = None  # None: the installed TensorRT
    trtexec: tuple[str, ...] = field(default_factory=default_trtexec)
    polygraphy: tuple[str, ...] | None = None
    cuda_graphs: tuple[bool, ...] = (False, True)
    warmup_ms: int = 500
    duration_s: float = 3.0
    eval_limit: int | None = None
    calib_images: int | None = None  # caps every recipe's calib_images (e.g. for a small folder)
    compare_images: int = 4  # real images for the Polygraphy comparison; 0 skips it
    prep_cache: dict = field(default_factory=dict, compare=False, repr=False)  # preprocessed eval images

    def version(self) -> str:
        """The TensorRT to plan for: the one given, else the installed one, else trt_plan's default."""
        return self.trt_version or detect_version()

    def layout(self, model: str) -> Layout:
        return Layout(model, self.root, self.results, self.overwrite)

    def adapt(self, recipe: Recipe) -> Recipe:
        """The recipe as this run executes it: the ONNX override and the calibration-image cap applied, so names and
        keys say what actually ran (a capped n400 point is an n32 point)."""
        changes = {}
        if self.onnx is not None:
            changes["onnx"] = str(self.onnx)
        if self.calib_images and recipe.calibrated and recipe.calib_images > self.calib_images:
            changes["calib_images"] = self.calib_images
        if self.level is not None and recipe.builder_optimization_level != self.level:
            changes["builder_optimization_level"] = self.level
        return recipe.replace(**changes) if changes else recipe

    def engine_profiles(self, recipe: Recipe) -> list[str]:
        if self.profiles is None:
            return list(recipe.profiles)
        missing = [p for p in self.profiles if p not in recipe.profiles]
        if missing:
            raise UserError(f"recipe {recipe.name!r} has no profile {missing[0]!r}; its profiles are "
                            f"{', '.join(recipe.profiles)}")
        return list(self.profiles)


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The flags every driver of runs (pipeline, sweep, summary, e2e) takes, mapped onto Setup."""
    add_data(ap)
    add_results(ap)
    ap.add_argument("--onnx", help="start from this ONNX instead of each recipe's model")
    add_profiles(ap)
    add_level(ap)
    add_trt(ap)
    add_trtexec(ap)
    add_polygraphy(ap)
    ap.add_argument("--cuda-graphs", choices=GRAPH_MODES, default="both",
                    help="time with CUDA graphs, without, or both (default)")
    add_timing(ap)
    ap.add_argument("--eval-limit", type=positive_int, help="score only the first N evaluation images")
    ap.add_argument("--compare-images", type=non_negative_int, default=4,
                    help="real images for the Polygraphy comparison against ONNX Runtime (0: skip it)")


def setup_from_args(args) -> Setup:
    onnx = Path(args.onnx).resolve() if args.onnx else None
    if onnx is not None and not onnx.is_file():
        raise UserError(f"{args.onnx}: no such ONNX model (ONNX= / --onnx); export one with make export")
    return Setup(calib_dir=Path(args.calib_dir), eval_dir=Path(args.eval_dir), results=Path(args.results).resolve(),
                 overwrite=args.overwrite, onnx=onnx,
                 profiles=tuple(args.profiles.split(",")) if args.profiles else None, level=args.level,
                 trt_version=args.trt,
                 trtexec=tuple(shlex.split(args.trtexec)) if args.trtexec else default_trtexec(),
                 polygraphy=tuple(shlex.split(args.polygraphy)) if args.polygraphy else None,
                 cuda_graphs=GRAPH_MODES[args.cuda_graphs], warmup_ms=args.warmup_ms, duration_s=args.duration,
                 eval_limit=args.eval_limit, calib_images=args.calib_images, compare_images=args.compare_images)


def setup_to_args(setup: Setup) -> list[str]:
    """The flags that give `setup` back through setup_from_args: how a sweep hands its setup to each job."""
    mode = next(m for m, g in GRAPH_MODES.items() if g == setup.cuda_graphs)
    args = ["--calib-dir", str(setup.calib_dir), "--eval-dir", str(setup.eval_dir), "--results", str(setup.results),
            "--trtexec", shlex.join(setup.trtexec), "--cuda-graphs", mode, "--duration", f"{setup.duration_s:g}",
            "--warmup-ms", str(setup.warmup_ms), "--compare-images", str(setup.compare_images)]
    for flag, value in (("--onnx", setup.onnx), ("--level", setup.level), ("--trt", setup.trt_version),
                        ("--eval-limit", setup.eval_limit),
                        ("--calib-images", setup.calib_images),
                        ("--polygraphy", shlex.join(setup.polygraphy) if setup.polygraphy else None)):
        if value is not None:
            args += [flag, str(value)]
    return args + (["--overwrite"] if setup.overwrite else [])
