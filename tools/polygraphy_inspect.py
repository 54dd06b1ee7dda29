"""`make inspect`: Polygraphy's layer view of a recipe's engines, for layer-by-layer debugging.

For each of the recipe's deployment profiles whose engine the run built (its newest record with the recipe's settings):
  polygraphy inspect model ENGINE --model-type engine --show layers
(every layer TensorRT kept, with its inputs' and outputs' shapes, formats and precisions, from the engine inspector;
our engines are built with --profilingVerbosity=detailed, so nothing is left out). Polygraphy reads an engine through
TensorRT itself, from 8.6.1 on. Where it cannot here (no TensorRT, an older one, no engine built yet), one line says why
and the ONNX the engine is built from is inspected instead, which shows where the Q/DQ pairs sit (also where Polygraphy
fails on the engine inspector's JSON, as it does on TensorRT 8.6.1's: `make profile` lists those layers instead):
  polygraphy inspect model MODEL.onnx --model-type onnx --show layers
(the recipe's Q/DQ model; the FP32 model for fp16 and int8-implicit; AutoCast's FP16 model on TensorRT 11).
Each listing goes to logs/<model>/inspect/<engine or ONNX file name>.txt, headed by the command that made it.
Usage: python -m tools.polygraphy_inspect RECIPE [--model yolo11s] [--profiles b1] [pipeline flags]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.compare import default_polygraphy, run_logged_text
from tools.core.cli import add_model
from tools.core.errors import UserError, run_main
from tools.core.recipe import Recipe, load
from tools.core.record import engine_id, newest_per, read_records, settings_of
from tools.core.setup import Setup, add_setup_args, setup_from_args
from tools.pipeline import Point

MIN_TRT = (8, 6, 1)
# Polygraphy parses the engine inspector's JSON strictly, and TensorRT 8.6 writes raw control characters into its
# strings (NVIDIA/TensorRT#2779): there the engine view fails, while tools/yolo/layers.py reads the same JSON leniently
UNPARSABLE_INSPECTOR_JSON = "JSONDecodeError: Invalid control character"


def installed_tensorrt() -> str | None:
    try:
        import tensorrt  # optional: only the GPU side has TensorRT; its absence is a reason, not an error

        return tensorrt.__version__
    except ImportError:
        return None


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def engine_view_blocked(version: str | None) -> str | None:
    """Why Polygraphy cannot show an engine's layers here, or None."""
    if version is None:
        return "TensorRT is not installed here (python -c 'import tensorrt' fails), and Polygraphy reads engines " \
               "through it; run this on the GPU machine"
    if version_tuple(version) < MIN_TRT:
        return f"TensorRT {version} is older than {'.'.join(map(str, MIN_TRT))}, which Polygraphy's engine view needs"
    return None


def built_engines(recipe: Recipe, setup: Setup) -> dict[str, dict]:
    """{profile: the newest record of this recipe's engine}, among the records made with exactly its settings."""
    layout = setup.layout(recipe.model)
    mine = [r for r in read_records(layout.points) if "build" in r and r["name"] == recipe.name
            and r["level"] == recipe.builder_optimization_level and settings_of(r) == recipe.settings()]
    return {profile: rec for (_, profile, _), rec in newest_per(mine, engine_id).items()}


def command(polygraphy, model_file: Path, kind: str) -> list[str]:
    return [*polygraphy, "inspect", "model", str(model_file), "--model-type", kind, "--show", "layers"]


class UnparsableInspectorJson(Exception):
    """Polygraphy failed on the engine inspector's JSON: a reason to show the ONNX instead, not an error."""


def inspect(polygraphy, model_file: Path, kind: str, point: Point, log=print) -> Path:
    out = point.layout.logs / "inspect" / f"{model_file.name}.txt"
    rc, text = run_logged_text(command(polygraphy, model_file, kind), out)
    if rc != 0 and kind == "engine" and UNPARSABLE_INSPECTOR_JSON in text:
        raise UnparsableInspectorJson(f"Polygraphy cannot parse its engine inspector JSON (raw control characters, as "
                                      f"TensorRT 8.6 writes them: NVIDIA/TensorRT#2779; {point.layout.rel(out)})")
    if rc != 0:
        raise UserError(f"{out}: polygraphy inspect model failed on {point.layout.rel(model_file)} (exit {rc}); "
                        f"read the log")
    log(text.rstrip())
    log(f"wrote {point.layout.rel(out)}")
    return out


def run(recipe_path, recipe: Recipe, setup: Setup, log=print) -> list[Path]:
    """Inspect the recipe's engines where Polygraphy can read them, else (once) the ONNX they are built from."""
    recipe = setup.adapt(recipe)
    point = Point(recipe, setup)
    point.model_onnx  # the model is checked before anything is looked for
    polygraphy = list(setup.polygraphy) if setup.polygraphy else default_polygraphy()
    blocked = engine_view_blocked(installed_tensorrt())
    found = built_engines(recipe, setup)
    make = f"RECIPE={recipe_path} MODEL={recipe.model}"
    written, instead = [], False
    for profile in setup.engine_profiles(recipe):
        rec = found.get(profile)
        engine = point.layout.resolve(rec["build"]["engine"]) if rec else None
        if engine is None or not engine.is_file():
            gone = f" ({point.layout.rel(engine)} is gone)" if engine else ""
            log(f"{recipe.name} [{profile}]: no engine yet{gone}; `make engine {make}` builds it on a GPU machine")
            instead = True
            continue
        why = blocked
        if not why:
            try:
                written.append(inspect(polygraphy, engine, "engine", point, log))
                continue
            except UnparsableInspectorJson as e:
                why = f"{e}; `make profile {make}` lists its layers and their precisions"
        log(f"{recipe.name} [{profile}]: engine {point.layout.rel(engine)} not inspected: {why}")
        instead = True
    if instead:
        onnx = point.onnx  # before an end-to-end wrapper: the Q/DQ pairs sit there, made or not
        if not onnx.is_file():
            raise UserError(f"{point.layout.rel(onnx)}: no ONNX of recipe {recipe.name!r} to inspect instead either; "
                            f"`make quantize {make}` makes it")
        log(f"{recipe.name}: the ONNX its engines are built from instead, {point.layout.rel(onnx)}:")
        written.append(inspect(polygraphy, onnx, "onnx", point, log))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.polygraphy_inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    add_model(ap)
    add_setup_args(ap)
    args = ap.parse_args(argv)
    run(args.recipe, load(args.recipe, args.model), setup_from_args(args))


if __name__ == "__main__":
    run_main(main)
