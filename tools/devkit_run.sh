#!/bin/bash
# How the GPU half ran on our lent GPU machine, which has neither trtexec nor a TensorRT of its own:
# ../shared/devkit gives TensorRT 8.6 under `py311`, so PY=py311 and make falls back to tools/trtexec_py.py.
# Inputs arrive in parts under /tmp (dparts: eval.tar.*, calib.tar.*; qparts: quantized models from `make cpu`
# and the sweep's CPU stage, plus any extra wheels). Each call gets a fresh copy of the working tree, so records
# are kept in /tmp between calls. Usage: bash tools/devkit_run.sh refs|sweep|tests [make/pytest args]; the default
# sweep ran as three calls of `bash tools/devkit_run.sh sweep SWEEP_ARGS="--stages gpu --stop-after 420"`.
set -uo pipefail
source /tmp/kit/env.sh
DATA=/tmp/data
mkdir -p "$DATA" models/yolo11n/quant /tmp/pylib /tmp/keep
[ -d "$DATA/val2017-eval" ] || cat /tmp/dparts/eval.tar.* | tar -x -C "$DATA"
[ -d "$DATA/calib" ] || cat /tmp/dparts/calib.tar.* | tar -x -C "$DATA"
cp -n /tmp/qparts/*.onnx /tmp/qparts/*.json models/yolo11n/quant/ 2>/dev/null
for w in /tmp/qparts/*.whl; do [ -e "$w" ] && py311 -m zipfile -e "$w" /tmp/pylib; done  # extra wheels, if sent
cp -r /tmp/keep/. . 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/pylib
ARGS=(PY=py311 EVAL_DIR="$DATA/val2017-eval" CALIB_DIR="$DATA/calib")
action=$1; shift
case "$action" in
  refs)  timeout "${LIMIT:-560}" make gpu "${ARGS[@]}" "$@" ;;
  sweep) timeout "${LIMIT:-560}" make sweep "${ARGS[@]}" "$@" ;;
  tests) timeout "${LIMIT:-300}" py311 -m pytest -q -p no:cacheprovider tests/test_gpu.py "$@" ;;
esac
echo "exit $? after $SECONDS s"
cp -r --parents results logs /tmp/keep/ 2>/dev/null
tar czf "$OUT/$action-$(date +%H%M%S).tgz" results logs calib/yolo11n/*.cache 2>/dev/null
