"""The sweep table: one row per configuration, builder level, deployment profile and batch, and how it is read
(the faster of CUDA graph and plain timings, the latency and throughput profiles, the Pareto front).

Written by tools.sweep (sweep.json/csv), read by tools.report and tools.sizes.
"""
from __future__ import annotations

from tools.core.errors import UserError
from tools.core.grid import Grid, label_of
from tools.core.record import engine_rows


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names on the Pareto front of {name: (cost, mAP)} (lower cost, higher mAP), cheapest first: no other point
    is at least as cheap and as accurate without being the same pair."""
    return sorted((c for c, (cost, m) in points.items()
                   if not any(oc <= cost and om >= m and (oc, om) != (cost, m) for oc, om in points.values())),
                  key=lambda c: points[c])


def best(row: dict, field: str) -> float:
    """The faster of the CUDA-graph and plain timings of a row (a deployment picks the better one)."""
    values = [v for v in (row.get(field), row.get(f"{field}_cuda_graph")) if v is not None]
    return (min if field.startswith("latency") else max)(values)


def p99(row: dict) -> float | None:
    """p99 of the mode (CUDA graph or not) whose median `best` reports."""
    graph = row.get("latency_ms_p50_cuda_graph")
    if graph is not None and graph <= row["latency_ms_p50"]:
        return row.get("latency_ms_p99_cuda_graph")
    return row.get("latency_ms_p99")


def selection_map(row: dict, half: str = "a") -> float:
    """The mAP the rule reads: half A of the evaluation images where the record has halves, else all of them."""
    return row.get(f"map50_95_{half}", row["map50_95"])


class Table:
    """The sweep's rows by (level, profile, batch, config), with the latency and throughput profiles named."""

    def __init__(self, rows: list[dict], final_level: int | None = None):
        if not rows:
            raise UserError("the sweep table has no rows; run `make sweep` first")
        self.rows = rows
        self.levels = sorted({r["level"] for r in rows})
        self.final = final_level if final_level in self.levels else self.levels[-1]
        sizes = {r["profile"]: r["batch"] for r in sorted(rows, key=lambda r: r["batch"])}
        self.latency_profile = min(sizes, key=lambda p: min(r["batch"] for r in rows if r["profile"] == p))
        self.throughput_profile = max(sizes, key=lambda p: max(r["batch"] for r in rows if r["profile"] == p))
        self.small = min(r["batch"] for r in rows if r["profile"] == self.latency_profile)
        self.large = max(r["batch"] for r in rows if r["profile"] == self.throughput_profile)

    def at(self, level: int, profile: str, batch: int) -> dict[str, dict]:
        return {r["config"]: r for r in self.rows if r["level"] == level and r["profile"] == profile
                and r["batch"] == batch}

    def latency(self, level=None) -> dict[str, dict]:
        return self.at(self.final if level is None else level, self.latency_profile, self.small)

    def throughput(self, level=None) -> dict[str, dict]:
        return self.at(self.final if level is None else level, self.throughput_profile, self.large)


def sweep_rows(records: list[dict], grid: Grid) -> list[dict]:
    rows = []
    for rec in records:
        recipe = rec["recipe"]
        qdq = rec["precision"] == "int8-qdq"
        meta = {"config": rec["name"], "precision": rec["precision"], "key": rec["key"],
                **{k: label_of(k, recipe[k], grid.axes[k], owner=rec["name"]) if qdq else "" for k in grid.axes},
                "level": rec["level"], "profile": rec["profile"]["name"], "random_weights": rec.get("random_weights"),
                "gpu": rec["gpu"], "tensorrt": rec["trt_version"]}
        rows += [{**meta, **row} for row in engine_rows(rec)]
    return rows


def stage_seconds(records: list[dict]) -> dict:
    """Stage seconds summed over the points, as each record logged them: the sweep's GPU work across resumed runs
    and GPUs (compare with the wall time for the speed-up of running points in parallel)."""
    total = {}
    for rec in records:
        for stage, s in rec.get("stage_seconds", {}).items():
            total[stage] = round(total.get(stage, 0) + s, 1)
    return {**total, "total": round(sum(total.values()), 1)}
