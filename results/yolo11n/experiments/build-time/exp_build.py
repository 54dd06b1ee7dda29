"""Build-time experiments under TensorRT 8.6 (py311): builds in one process sharing an in-memory timing cache.
usage: exp_build.py OUTDIR LEVEL JOB... where JOB = name:onnx:flags(fp16|fp16+int8):batch"""
import json, resource, sys, time
import tensorrt as trt

out, level, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
logger = trt.Logger(trt.Logger.WARNING)
t0 = time.perf_counter()
builder = trt.Builder(logger)
print(f"builder up in {time.perf_counter()-t0:.1f} s", flush=True)
cache = None
for job in jobs:
    name, onnx, flags, batch = job.split(":")
    batch = int(batch)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(net, logger)
    assert parser.parse_from_file(onnx), onnx
    cfg = builder.create_builder_config()
    for f in flags.split("+"):
        cfg.set_flag(getattr(trt.BuilderFlag, f.upper()))
    cfg.builder_optimization_level = level
    cfg.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    prof = builder.create_optimization_profile()
    s = (batch, 3, 640, 640)
    prof.set_shape("images", s, s, s)
    cfg.add_optimization_profile(prof)
    if cache is None:
        cache = cfg.create_timing_cache(b"")
    ok = cfg.set_timing_cache(cache, ignore_mismatch=False)
    t = time.perf_counter()
    plan = builder.build_serialized_network(net, cfg)
    dt = time.perf_counter() - t
    ru = resource.getrusage(resource.RUSAGE_SELF)
    open(f"{out}/{name}.engine", "wb").write(bytes(plan))
    rec = {"job": name, "level": level, "batch": batch, "flags": flags, "build_s": round(dt, 1), "cache_set": ok,
           "cache_bytes": len(bytes(cache.serialize())), "mib": round(plan.nbytes / 2**20, 2),
           "cpu_s_total": round(ru.ru_utime + ru.ru_stime, 1), "wall_s_total": round(time.perf_counter() - t0, 1)}
    print(json.dumps(rec), flush=True)
    with open(f"{out}/builds.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
