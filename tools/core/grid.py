"""Sweep grids: the schema of recipes/grids/*.yaml, and how a grid expands into recipes (its points), each named by
the axis values it takes.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from tools.core.errors import UserError
from tools.core.files import REPO, digest
from tools.core.recipe import FIELDS, Recipe, load, read_yaml, validation_message
from tools.core.record import read_json

SHORT = {"calibration_method": "", "calib_images": "n", "builder_optimization_level": "L", "nodes_to_exclude": "x-",
         "calibration_percentile": "p", "qdq_rewrites": "r-", "graph_rewrites": "g-", "input_io_format": "in-",
         "output_io_format": "out-"}


class Bench(BaseModel):
    """Timing protocol for every point of a sweep, references included."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    cuda_graphs: tuple[StrictBool, ...] = (True,)
    duration_s: Annotated[float, Field(gt=0)] = 1.5
    warmup_ms: Annotated[StrictInt, Field(gt=0)] = 200
    compare_images: Annotated[StrictInt, Field(ge=0)] = 0
    # images for the references' `polygraphy run` comparison, where set (default: compare_images, as every point):
    # the yardsticks' records carry one; a comparison is in no key, so a finished reference gains it and keeps its key
    compare_references: Annotated[StrictInt, Field(ge=0)] | None = None


class Screen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    builder_optimization_level: Annotated[StrictInt, Field(ge=0, le=5)]
    front_max: Annotated[StrictInt, Field(ge=1)] = 6  # configurations re-measured at the final level, at most


class GridFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str | None = None
    base: str
    design: Literal["one-at-a-time", "product"] = "one-at-a-time"
    references: tuple[str, ...] = ()
    bench: Bench = Bench()
    screen: Screen | None = None
    profiles: dict[str, dict] | None = None  # every point's deployment profiles (default: each recipe's own)
    axes: dict[str, list | dict] = {}


GRID_HINTS = {"base": "a recipe path, e.g. recipes/int8-qdq.yaml", "references": "a YAML list of recipe paths",
              "axes": "a mapping of recipe key -> list of values or {label: value}",
              "design": "one-at-a-time or product", "screen": "{builder_optimization_level: 1}"}


@dataclass(frozen=True)
class Grid:
    path: str
    model: str
    base: Recipe
    design: str
    references: tuple[Recipe, ...]
    axes: dict  # key -> {label: value}
    bench: Bench
    screen: Screen | None


# recipe keys a grid cannot sweep: they name or describe a point, or have a grid key of their own
UNSWEPT = {"name": "the sweep names its points", "description": "the sweep describes its points",
           "notes": "notes shape nothing", "model": "a grid sweeps one model; set the grid's `model:`",
           "onnx": "a grid sweeps one model; set its base recipe's `onnx:` or ONNX=",
           "profiles": "set the grid's own `profiles:` key"}


def prefix(key: str) -> str:
    return SHORT.get(key, key + "-")


def label(key: str, value) -> str:
    """A point-name part for a value: the value itself where it can be part of a file name, else its digest."""
    text = f"{prefix(key)}{value}"
    return text if re.fullmatch(r"[A-Za-z0-9._-]+", text) else f"{prefix(key)}{digest(value)[:6]}"


def check_axis(key: str, values, base: Recipe, axes: dict, source: str) -> None:
    """Refuse an axis that cannot make points: a key no grid sweeps, no values, or a key that shapes nothing for
    the precisions the points have (calibration methods on an fp16 base would collapse into one point). `axes`: the
    axes a point combines this one with (a product grid's; none one at a time)."""
    if key not in FIELDS:
        raise UserError(f"{source}: axis {key!r} is not a recipe key; recipe keys are {', '.join(FIELDS)}")
    if key in UNSWEPT:
        raise UserError(f"{source}: axis {key!r} cannot be swept ({UNSWEPT[key]}); remove the axis")
    if not values:
        raise UserError(f"{source}: axis {key!r} has no values; give it at least one or remove it")
    meta = Recipe.model_fields[key].json_schema_extra or {}
    precisions = {base.precision, *_values(axes.get("precision", []))}
    if meta and not precisions & set(meta["precisions"]):
        raise UserError(f"{source}: axis {key!r} shapes only {', '.join(meta['precisions'])} recipes, but the points "
                        f"are {', '.join(sorted(precisions))}; use a base of that precision or remove the axis")
    if meta and meta["when"]:
        other, needed = meta["when"]
        if needed != getattr(base, other) and needed not in _values(axes.get(other, [])):
            raise UserError(f"{source}: axis {key!r} shapes only recipes with {other}: {needed}, and no point has it; "
                            f"set it in the base or add it to the {other!r} axis")


def _values(axis) -> list:
    return list(axis.values()) if isinstance(axis, dict) else list(axis)


def axis_values(key: str, values, root: Path, source: str) -> dict:
    """An axis as {label: value}; lists get labels from their values, mappings name their values."""
    if isinstance(values, list):
        return {label(key, v): v for v in values}
    out = {}
    for name, v in values.items():
        if isinstance(v, dict) and "from" in v:  # other mappings are values (`deploy: {input: ...}`)
            if set(v) != {"from"}:
                raise UserError(f"{source}: axis {key!r} value {name!r}: give a value or {{from: proposal.json}}")
            v = proposal(root / v["from"], source)
            if v is None:
                continue
        out[f"{prefix(key)}{name}"] = v
    return out


def proposal(path: Path, source: str):
    """The exclusion set `make sensitivity` proposed, or None (with a note) when it has not run."""
    if not path.is_file():
        print(f"note: {path} does not exist yet (run `make sensitivity`); its axis value is left out")
        return None
    found = read_json(path, "sensitivity result").get("proposal", {}).get("nodes_to_exclude")
    if not isinstance(found, list):
        raise UserError(f"{path}: has no proposal.nodes_to_exclude list (named in {source}); rerun `make sensitivity`")
    return found


def load_grid(path, root: Path = REPO, model: str | None = None) -> Grid:
    """`model` (--model, make's MODEL= where set): the size of a grid that names none; a grid that names one refuses
    another."""
    data = read_yaml(path, "grid; see recipes/grids/ for examples")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a grid is a YAML mapping (model, base, references, axes, ...)")
    try:
        g = GridFile.model_validate(data)
    except ValidationError as e:
        raise UserError(validation_message(str(path), e, GRID_HINTS, tuple(GridFile.model_fields))) from None
    if model is not None and g.model is not None and model != g.model:
        raise UserError(f"{path}: is a grid for {g.model} (its `model:`), not {model}; drop MODEL= (--model) or run "
                        f"the grid of {model} (GRID=recipes/grids/{model}.yaml where there is one)")
    model = model or g.model  # the recipes are for every size: the grid's `model:` picks one
    base = load(root / g.base, model)
    for key, values in g.axes.items():
        check_axis(key, values, base, g.axes if g.design == "product" else {}, str(path))
    if g.profiles is not None:
        base = base.replace(profiles=g.profiles)
    refs = tuple(load(root / r, model) for r in g.references)
    if g.profiles is not None:
        refs = tuple(r.replace(profiles=g.profiles) for r in refs)
    axes = {key: axis_values(key, values, root, str(path)) for key, values in g.axes.items()}
    return Grid(str(path), base.model, base, g.design, refs, axes, g.bench, g.screen)


def label_of(key: str, value, axis: dict, owner: str | None = None) -> str:
    """The axis label of `value`; a scalar off the axis (a capped image count) is named by itself, a list off the
    axis (a reference's own exclusions) after `owner`, the recipe it comes from, or else by a digest."""
    for name, v in axis.items():
        if isinstance(value, BaseModel) and isinstance(v, dict):  # a mapping-valued key (deploy): compare as parsed
            v = type(value).model_validate(v)
        if v == value or (isinstance(v, list) and tuple(v) == tuple(value if isinstance(value, (list, tuple)) else
                                                                     (value,))):
            return name
    if isinstance(value, (int, float, str)):
        return label(key, value)
    return f"{prefix(key)}{f'as-{owner}' if owner else digest(value)[:6]}"


def point_name(grid: Grid, recipe: Recipe) -> str:
    parts = [label_of(k, getattr(recipe, k), grid.axes[k]) for k in grid.axes if not recipe.at_omitted_default(k)]
    return ("qdq-" if recipe.precision == "int8-qdq" else recipe.precision + "-") + ("-".join(parts) or "base")


def expand(grid: Grid, setup=None) -> list[Recipe]:
    """References first, then the grid's points, each as the run will execute it (setup.adapt: a capped image count
    renames the point); points with identical settings collapse to the first."""
    adapt = setup.adapt if setup else (lambda r: r)
    combos = []
    if grid.design == "product":
        keys = list(grid.axes)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(grid.axes[k].values() for k in keys))]
    else:
        combos.append({})
        for key, axis in grid.axes.items():
            for value in axis.values():
                if (tuple(value) if isinstance(value, list) else value) != getattr(grid.base, key):
                    combos.append({key: value})
    points, seen = [], set()
    for ref in grid.references:
        ref = adapt(ref)
        seen.add(digest(ref.settings()))
        points.append(ref)
    for changes in combos:
        r = adapt(grid.base.replace(**changes))
        r = r.replace(name=point_name(grid, r), description=f"sweep point of {grid.base.name}: {changes or 'base'}")
        if digest(r.settings()) not in seen:
            seen.add(digest(r.settings()))
            points.append(r)
    return points
