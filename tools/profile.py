"""`make profile`: the per-layer timing of engines side by side, by YOLO block, layer kind and precision.

With --recipes, the newest record of each recipe that holds its per-layer timing (the pipeline's `layers` stage,
tools/bench.py's time_layers) for each deployment profile, into <results>/<model>/profile/<profile>-L<level>/;
with --layers/--profile, trtexec's exports given by hand. The tables, summary and plot are tools/yolo/layers.py's.

Usage: python -m tools.profile --recipes recipes/fp16.yaml recipes/int8-qdq.yaml [--model yolo11n] [--results DIR]
       python -m tools.profile --layers A.layers.json --profile A.profile.json [--layers B... --profile B...]
         --labels fp16,int8-qdq -o OUTDIR          (.json.gz files are read as well)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.core.cli import add_model, add_profiles, add_results
from tools.core.errors import UserError, run_main
from tools.core.files import REPO
from tools.core.layout import Layout
from tools.core.recipe import load as load_recipe
from tools.core.record import bench_row, engine_id, newest_per, read_records
from tools.yolo.layers import write_tables


def from_records(recipe_paths, results, overwrite: bool = False, profiles=None, top: int = 12, model=None) -> dict:
    """`make profile`: for each deployment profile, the recipes' engines side by side (on `model`, as
    tools/core/recipe.py's load takes it), read from the newest record of each recipe that holds a per-layer profile
    (the pipeline's `layers` stage), into <results>/<model>/profile/."""
    recipes = [load_recipe(p, model) for p in recipe_paths]
    layout = Layout(recipes[0].model, REPO, Path(results).resolve(), overwrite)
    found = newest_per((r for r in read_records(layout.points) if "layers" in r), engine_id)
    written = {}
    for profile in profiles or recipes[0].profiles:
        pairs, e2e = [], {}
        for recipe in recipes:
            rec = found.get((recipe.name, profile, recipe.builder_optimization_level))
            if rec is None:
                raise UserError(f"{layout.points}: no per-layer profile of {recipe.name!r} [{profile}] at level "
                                f"{recipe.builder_optimization_level}; run `make profile RECIPE=...` (stage layers)")
            layers = rec["layers"]
            pairs.append((recipe.name, layout.resolve(layers["layers_json"]), layout.resolve(layers["profile_json"])))
            batch = layers["batch"]
            timing = (bench_row(rec, batch, False) or bench_row(rec, batch, True)) if "bench" in rec else None
            if timing:
                e2e[recipe.name] = timing["latency_ms_p50"]
        out = layout.layer_tables(profile, recipes[0].builder_optimization_level)
        for tracked in (p for p in out.glob("*") if p.is_file()):
            layout.guard(tracked)
        written[profile] = write_tables(pairs, out, e2e, top)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", help="compare these recipes' profiled engines (from the run's records)")
    add_model(ap)
    add_results(ap)  # with --recipes
    add_profiles(ap)  # with --recipes
    ap.add_argument("--layers", action="append", help="trtexec --exportLayerInfo JSON (repeat)")
    ap.add_argument("--profile", action="append", help="trtexec --exportProfile JSON (repeat)")
    ap.add_argument("--labels", help="comma-separated engine names (default: the layer files' names)")
    ap.add_argument("--e2e-ms", help="comma-separated end-to-end GPU medians (ms) to set beside the layer sums")
    ap.add_argument("--top", type=int, default=12, help="reformat layers listed per engine")
    ap.add_argument("-o", "--out-dir", help="where the CSVs, summary and plot go (with --layers/--profile)")
    args = ap.parse_args(argv)
    if args.recipes:
        written = from_records(args.recipes, args.results, args.overwrite,
                               args.profiles.split(",") if args.profiles else None, args.top, args.model)
        for paths in written.values():
            for p in paths.values():
                print(f"wrote {p}")
        return
    if not (args.layers and args.profile and args.out_dir):
        raise UserError("give --recipes R.yaml ..., or --layers/--profile pairs and -o OUTDIR")
    if len(args.layers) != len(args.profile):
        raise UserError(f"{len(args.layers)} --layers but {len(args.profile)} --profile; give one of each per engine")
    labels = args.labels.split(",") if args.labels else [Path(p).name.split(".")[0] for p in args.layers]
    if len(labels) != len(args.layers) or len(set(labels)) != len(labels):
        raise UserError(f"--labels {args.labels!r}: give one distinct name per engine ({len(args.layers)})")
    e2e = {}
    if args.e2e_ms:
        try:
            e2e = dict(zip(labels, map(float, args.e2e_ms.split(",")), strict=True))
        except ValueError:
            raise UserError(f"--e2e-ms {args.e2e_ms!r}: give one number (ms) per engine") from None
    paths = write_tables(list(zip(labels, args.layers, args.profile)), args.out_dir, e2e, args.top)
    for p in paths.values():
        print(f"wrote {p}")


if __name__ == "__main__":
    run_main(main)
