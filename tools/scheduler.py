"""Run chains of jobs over the GPUs of one machine: timings alone on their GPU, builds side by side.

A chain is one point's stages in order (engine -> bench -> accuracy). A job is `exclusive` when it measures the GPU
(timings): it starts only on a GPU with nothing else running, and no job starts beside it. Other jobs (engine builds,
which are host work: kernel compilation and tactic timing) share a GPU, up to `shared_per_gpu` at a time; `light`
jobs (accuracy: decoding and COCOeval around a fraction of a second of inference) run beside them without limit. A waiting exclusive job makes
the least busy GPU drain (no new shared job starts there) so timings are never starved by a stream of builds.
The launcher is given: in a sweep it runs `python -m tools.pipeline` with CUDA_VISIBLE_DEVICES set; tests pass fakes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Job:
    chain: str  # the point it belongs to; a chain's jobs run in order
    stage: str
    exclusive: bool = False
    affinity: str = ""  # builds of equal affinity prefer a GPU that built that kind before (its timing cache is warm)
    light: bool = False  # host work that does not count against shared_per_gpu (accuracy: decoding and COCOeval)


@dataclass
class Gpu:
    name: str
    running: list = field(default_factory=list)  # jobs running now
    seen: set = field(default_factory=set)  # affinities of the builds started here: its build server cached them

    @property
    def busy_exclusive(self) -> bool:
        return any(j.exclusive for j in self.running)


def run_chains(chains: list[list[Job]], gpus: list[str], launch: Callable[[Job, str], None], shared_per_gpu: int = 1,
               on_done: Callable[[Job, str, BaseException | None], list | None] = lambda job, gpu, error: None,
               stop_after: float | None = None) -> dict[str, str]:
    """Run every chain; `launch(job, gpu)` runs one job to its end (raising on failure); `on_done` may return new
    chains, which join the head of the queue (a sweep adds its front once the screening is done). Returns {chain:
    error} for chains that failed (their later jobs are skipped) or were never started because `stop_after`
    seconds had passed (a bounded run ends between points; the next run resumes from the records)."""
    if not gpus:
        raise ValueError("no GPU to run on")
    state = [Gpu(g) for g in gpus]
    todo = {c[0].chain: list(c) for c in chains if c}
    order = list(todo)
    started, failures, active = set(), {}, {}
    lock = threading.Condition()
    t0 = time.monotonic()

    def worker(job: Job, gpu: Gpu):
        error = None
        try:
            launch(job, gpu.name)
        except BaseException as e:  # noqa: BLE001 - reported per chain, the others go on
            error = e
        with lock:
            gpu.running.remove(job)
            del active[job.chain]
            if error is not None:
                failures[job.chain] = str(error) or type(error).__name__
                todo.pop(job.chain, None)
            # chains added now (a sweep's front) are what the run's end waits on: they go ahead of the queue
            added = [c for c in on_done(job, gpu.name, error) or () if c]
            for chain in added:
                todo[chain[0].chain] = list(chain)
            order[:0] = [c[0].chain for c in added]
            lock.notify_all()

    def start(job: Job, gpu: Gpu):
        todo[job.chain].pop(0)
        if not todo[job.chain]:
            del todo[job.chain]
        started.add(job.chain)
        active[job.chain] = job
        gpu.running.append(job)
        if job.affinity:
            gpu.seen.add(job.affinity)
        threading.Thread(target=worker, args=(job, gpu), daemon=True).start()

    def ready() -> list[Job]:
        late = stop_after is not None and time.monotonic() - t0 > stop_after
        # the first chain always starts, so a bounded run makes progress however short its bound
        return [todo[c][0] for c in order
                if c in todo and c not in active and not (late and started and c not in started)]

    def place() -> bool:
        """Start what can start now; True if anything started."""
        jobs = ready()
        waiting = [j for j in jobs if j.exclusive]
        draining = []  # GPUs kept free of new jobs until a waiting timing can start there
        if waiting:
            idle = [g for g in state if not g.running]
            if idle:
                start(waiting[0], idle[0])
                return True
            # as many GPUs drain as timings wait, the least busy first
            draining = sorted((g for g in state if not g.busy_exclusive), key=lambda g: len(g.running))[:len(waiting)]
        usable = [g for g in state if g not in draining and not g.busy_exclusive]
        for job in (j for j in jobs if j.light):
            if usable:
                start(job, min(usable, key=lambda g: len(g.running)))
                return True
        heavy = [j for j in jobs if not j.exclusive and not j.light]
        load = lambda g: sum(not j.light for j in g.running)  # noqa: E731
        open_ = sorted((g for g in usable if load(g) < shared_per_gpu), key=load)
        if not (heavy and open_):
            return False
        # a GPU takes the first build it has a warm timing cache for; else the first build no GPU has one for (a
        # build another GPU could serve from its cache waits for that GPU), else the first in the queue
        for gpu in open_:
            job = next((j for j in heavy if j.affinity in gpu.seen), None)
            if job:
                start(job, gpu)
                return True
        warm = set().union(*(g.seen for g in state))
        start(next((j for j in heavy if not j.affinity or j.affinity not in warm), heavy[0]), open_[0])
        return True

    with lock:
        while True:
            while place():
                pass
            if not active:
                break
            lock.wait()
    for chain in order:
        if chain in todo and chain not in failures:
            failures[chain] = f"not started: --stop-after {stop_after:g} s had passed"
    return failures
