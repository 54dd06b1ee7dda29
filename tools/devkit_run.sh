#!/bin/bash
# How the GPU half runs on our lent GPU machines, which have neither trtexec nor a TensorRT of their own:
# ../shared/devkit gives TensorRT 8.6 under `py311`, so PY=py311 and make falls back to tools/trtexec_py.py.
# Inputs arrive in parts under /tmp/dparts: eval.tar.* (900 evaluation images), calib.tar.* (400 calibration images),
# quant.tar.* (the quantized models `make sweep --stages cpu` made on the CPU, with the tracked files left out of the
# upload to keep each call under its size limit), optionally engines.tar.* (an earlier lease's engines and build logs,
# from `engines`: timed and scored again without building, tools/pipeline.py engine_run) and wheels.tar.* (cp311
# wheels the kit lacks). The repo is copied to /tmp/w once, so a background job survives the fresh working tree
# each call brings, and results stay there between calls; every call packs them into $OUT.
# Usage:  bash tools/devkit_run.sh start 'make sweep SWEEP_ARGS=--stages=gpu'   (in the background, setsid)
#         bash tools/devkit_run.sh poll SECONDS    (wait, print progress, pack results into $OUT)
#         bash tools/devkit_run.sh run 'make ...'  (in the foreground)
#         bash tools/devkit_run.sh tests GPU       (tests/test_gpu.py on that GPU, in the background: tests.log)
#         bash tools/devkit_run.sh engines K       (part K of the engines and build logs into $OUT, four parts a call;
#                                                  K=0 packs them again, so a later call takes engines built since)
# tools/devkit_pack.sh makes the parts on this side (the kit, images, Q/DQ models, returned engines).
set -uo pipefail
source /tmp/kit/env.sh
W=/tmp/w D=/tmp/data
if [ ! -d "$W" ]; then
  mkdir -p "$W" "$D" /tmp/pylib && cp -r . "$W/"
  cat /tmp/dparts/eval.tar.* | tar -x -C "$D"
  cat /tmp/dparts/calib.tar.* | tar -x -C "$D"
  cat /tmp/dparts/quant.tar.* | tar -x -C "$W"
  if ls /tmp/dparts/engines.tar.* >/dev/null 2>&1; then cat /tmp/dparts/engines.tar.* | tar -x -C "$W"; fi
  if ls /tmp/dparts/wheels.tar.* >/dev/null 2>&1; then
    cat /tmp/dparts/wheels.tar.* | tar -x -C /tmp/pylib && for w in /tmp/pylib/*.whl; do py311 -m zipfile -e "$w" /tmp/pylib; done
  fi
fi
cd "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=$W:/tmp/pylib
export MAKEFLAGS="PY=py311 EVAL_DIR=$D/val2017-eval CALIB_DIR=$D/calib"
# only paths that exist: a missing one (no tests log yet) would fail the call while packing the rest; runs* takes
# the results folders of grids run beside the default one (RESULTS=runs-GRID)
pack() { tar czf "$OUT/results-$(date +%H%M%S).tgz" $(ls -d runs* logs calib/*/*.cache job.log tests*.log 2>/dev/null); }
case "$1" in
  start) setsid nohup bash -c "$2; echo \"exit \$? at \$(date +%T)\"" > "$W/job.log" 2>&1 < /dev/null &
         sleep 20; tail -5 "$W/job.log" ;;
  poll)  for _ in $(seq "$2"); do grep -q '^exit ' "$W/job.log" && break; sleep 1; done
         tail -25 "$W/job.log"; tail -4 tests*.log 2>/dev/null; nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader | tr '\n' ' '
         echo; ls runs*/*/points/*.json 2>/dev/null | wc -l; tail -3 tests.log 2>/dev/null; pack ;;
  run)   bash -c "$2"; pack ;;
  engines) # 15 MB parts: four fit the 64 MiB that one call brings back; part 0 packs afresh (engines built since)
         [ "$2" != 0 ] || rm -f /tmp/engines.tar.*
         [ -f /tmp/engines.tar.00 ] || tar cf - engines/*/*.engine logs/*/*.build.log | split -b 15000000 -d -a 2 - /tmp/engines.tar.
         ls /tmp/engines.tar.* | sed -n "$((4 * $2 + 1)),$((4 * $2 + 4))p" | xargs -r cp -t "$OUT/"
         echo "$(ls /tmp/engines.tar.* | wc -l) parts in all" ;;
  tests) CUDA_VISIBLE_DEVICES="$2" setsid nohup py311 -m pytest -v -p no:cacheprovider tests/test_gpu.py \
           ${3:+-k "$3"} > "$W/tests.log" 2>&1 < /dev/null &
         sleep 2; tail -3 "$W/tests.log" ;;
esac
