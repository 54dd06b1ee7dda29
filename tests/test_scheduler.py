"""The GPU scheduler on the CPU, with fake workers that sleep and log when they ran: timings alone on their GPU,
builds side by side up to the limit, chains in order, failures contained, --stop-after honoured."""
import threading
import time

import pytest

from tools.scheduler import Job, run_chains

DURATION = {"engine": 0.12, "bench": 0.04, "accuracy": 0.06}


def sweep(n_points, gpus, per_gpu, fail=(), stop_after=None, affinity=lambda i: ""):
    spans, lock = [], threading.Lock()

    def launch(job, gpu):
        start = time.monotonic()
        time.sleep(DURATION[job.stage])
        with lock:
            spans.append((job.chain, job.stage, gpu, job.exclusive, start, time.monotonic()))
        if (job.chain, job.stage) in fail:
            raise RuntimeError(f"{job.stage} broke")

    chains = [[Job(f"p{i}", "engine", False, affinity(i)), Job(f"p{i}", "bench", True),
               Job(f"p{i}", "accuracy", light=True)] for i in range(n_points)]
    t0 = time.monotonic()
    failures = run_chains(chains, gpus, launch, per_gpu, stop_after=stop_after)
    return spans, failures, time.monotonic() - t0


def overlapping(spans, span):
    name, stage, gpu, _, start, end = span
    return [s for s in spans if s[2] == gpu and (s[0], s[1]) != (name, stage) and s[4] < end and s[5] > start]


def test_timings_run_alone_on_their_gpu_and_builds_share_up_to_the_limit():
    spans, failures, _ = sweep(12, ["0", "1", "2"], per_gpu=2)
    assert not failures and len(spans) == 36
    for span in spans:
        if span[3]:  # a timing: nothing else on its GPU meanwhile
            assert not overlapping(spans, span)
        elif span[1] == "engine":  # at most per_gpu builds at once on a GPU; accuracy runs beside them
            assert sum(1 for s in spans if s[2] == span[2] and s[1] == "engine" and s[4] <= span[4] < s[5]) <= 2
    assert {s[2] for s in spans} == {"0", "1", "2"}  # every GPU got work


def test_accuracy_runs_beside_a_build_but_never_beside_a_timing():
    spans, _, _ = sweep(8, ["0"], per_gpu=1)
    assert any(s[1] == "accuracy" and any(o[1] == "engine" for o in overlapping(spans, s)) for s in spans)
    assert all(not overlapping(spans, s) for s in spans if s[1] == "bench")


def test_each_chain_runs_in_order():
    spans, _, _ = sweep(6, ["0", "1"], per_gpu=1)
    for i in range(6):
        mine = sorted((s for s in spans if s[0] == f"p{i}"), key=lambda s: s[4])
        assert [s[1] for s in mine] == ["engine", "bench", "accuracy"]
        assert all(a[5] <= b[4] for a, b in zip(mine, mine[1:]))


def test_more_gpus_finish_sooner():
    _, _, one = sweep(8, ["0"], per_gpu=1)
    _, _, four = sweep(8, ["0", "1", "2", "3"], per_gpu=1)
    assert four < one * 0.6


def test_a_failed_job_stops_its_chain_only():
    spans, failures, _ = sweep(4, ["0", "1"], per_gpu=1, fail={("p1", "engine")})
    assert list(failures) == ["p1"] and "engine broke" in failures["p1"]
    assert not [s for s in spans if s[0] == "p1" and s[1] != "engine"]
    assert len([s for s in spans if s[0] != "p1"]) == 9


def test_stop_after_starts_no_new_chain():
    spans, failures, _ = sweep(8, ["0"], per_gpu=1, stop_after=0.0)
    started = {s[0] for s in spans}
    assert started == {"p0"}  # the first chain always runs, to the end
    assert len([s for s in spans if s[0] == "p0"]) == 3
    assert set(failures) == {f"p{i}" for i in range(1, 8)} and all("not started" in v for v in failures.values())


def test_builds_of_one_kind_stay_on_the_gpu_that_built_that_kind():
    """Engines of equal affinity (same level, profile, precision) go where that kind was built last, so a build
    server's in-memory timing cache serves them."""
    spans, _, _ = sweep(8, ["0", "1"], per_gpu=1, affinity=lambda i: "a" if i % 2 == 0 else "b")
    gpu_of = {}
    for name, stage, gpu, *_ in spans:
        if stage == "engine":
            gpu_of.setdefault("a" if int(name[1:]) % 2 == 0 else "b", set()).add(gpu)
    assert gpu_of["a"] != gpu_of["b"] and all(len(g) == 1 for g in gpu_of.values())


def test_no_gpu_is_an_error():
    with pytest.raises(ValueError):
        run_chains([[Job("p", "engine")]], [], lambda job, gpu: None)


def test_chains_added_when_a_chain_ends_join_the_queue():
    """A sweep adds its front once the screening is done: new chains from on_done run like the others."""
    seen = []

    def on_done(job, gpu, error):
        seen.append(job.chain)
        if job.chain == "p0":
            return [[Job("late", "engine"), Job("late", "bench", True)]]
        return None

    failures = run_chains([[Job("p0", "engine")], [Job("p1", "engine")]], ["0", "1"],
                          lambda job, gpu: time.sleep(0.02), on_done=on_done)
    assert not failures and seen.count("late") == 2 and seen.index("late") > seen.index("p0")


def test_chains_added_when_a_chain_ends_go_ahead_of_the_queue():
    """The front is what the end of a sweep waits on: it starts before references still queued."""
    ran = []

    def on_done(job, gpu, error):
        return [[Job("front", "engine")]] if job.chain == "screen" else None

    chains = [[Job("screen", "engine")], [Job("ref1", "engine")], [Job("ref2", "engine")]]
    failures = run_chains(chains, ["0"], lambda job, gpu: ran.append(job.chain), on_done=on_done)
    assert not failures and ran == ["screen", "front", "ref1", "ref2"]


def test_a_build_another_gpu_is_warm_for_waits_for_it():
    """GPU 1 frees first; of the queued builds, `a` has a warm cache on busy GPU 0, `b` on none: GPU 1 takes `b`,
    and `a` goes to GPU 0 when it frees."""
    ran, lock = [], threading.Lock()
    length = {"a0": 0.3, "x": 0.2, "a1": 0.01, "b": 0.2}

    def launch(job, gpu):
        time.sleep(length[job.chain])
        with lock:
            ran.append((job.chain, gpu))

    chains = [[Job("a0", "engine", affinity="a")], [Job("x", "engine", affinity="x")],
              [Job("a1", "engine", affinity="a")], [Job("b", "engine", affinity="b")]]
    assert not run_chains(chains, ["0", "1"], launch)
    assert dict(ran) == {"x": "1", "b": "1", "a0": "0", "a1": "0"}
