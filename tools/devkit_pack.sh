#!/bin/bash
# The local half of tools/devkit_run.sh: a lease's inputs cut into parts that each fit one `run` call beside the
# working tree. A call carries 64 MiB in all, the tracked tree included, so a part is 64 MiB less the tree and 2 MB.
# Usage (in the repo root; everything goes under .devparts/, git-ignored):
#   bash tools/devkit_pack.sh kit                      ../shared/devkit/pack.sh's .devkit/pK -> .devparts/kit/kNN/
#   bash tools/devkit_pack.sh data EVAL_DIR CALIB_DIR   the images -> .devparts/data/{eval,calib}.tar.NN
#   bash tools/devkit_pack.sh quant RESULTS MODEL       every model (a Q/DQ one with its .json) that the records of
#                                                       `make sweep SWEEP_ARGS='--stages cpu'` under RESULTS/MODEL/onnxrt
#                                                       name and git does not track -> .devparts/data/quant.tar.NN
#   bash tools/devkit_pack.sh engines DIR...            the engines.tar.* parts `devkit_run.sh engines K` brought back
#                                                       (from one lease's call folders, in order) -> engines.tar.NN
# Each prints the parts it wrote. On the GPU machine: a kit part with `mkdir -p /tmp/kit/parts && cp
# .devparts/kit/kNN/* /tmp/kit/parts/`, a data part with `mkdir -p /tmp/dparts && cp .devparts/data/X /tmp/dparts/`
# (carry the path), then `bash /tmp/kit/parts/unpack.sh` and `bash tools/devkit_run.sh start ...`.
set -euo pipefail
OUT=${DEVPARTS:-.devparts}  # where the parts go (tests point it elsewhere)
limit=$((64 * 1024 * 1024))
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
part=$((limit - tree - 2000000))
fail() { echo "error: $*"; exit 2; }
[ "$part" -gt 5000000 ] || fail "the tracked tree ($tree bytes) leaves no room for parts in a 64 MiB call"

split_into() {  # stdin -> $1.00, $1.01, ... of $part bytes, in place of an earlier run's parts
  rm -f "$1".[0-9][0-9]
  split -b "$part" -d -a 2 - "$1."
  ls -la "$1".[0-9][0-9]
}

case "${1:-}" in
  kit)
    [ -f .devkit/p0/unpack.sh ] || fail "no .devkit/p0/unpack.sh: run bash ../shared/devkit/pack.sh first"
    rm -rf "$OUT/kit" && mkdir -p "$OUT/kit"
    # one stream in the parts' order, cut again; unpack.sh sorts the parts by name, so the names keep that order
    cat $(ls .devkit/p*/part* | sort -t/ -k3) | split -b "$part" -d -a 2 - "$OUT/kit/part"
    for p in "$OUT"/kit/part*; do n=${p##*part}; mkdir -p "$OUT/kit/k$n" && mv "$p" "$OUT/kit/k$n/part$n"; done
    cp .devkit/p0/unpack.sh .devkit/p0/zstd "$(ls -d "$OUT"/kit/k* | sort | tail -1)/"
    ls -d "$OUT"/kit/k* ;;
  data)
    [ -d "${2:-}" ] && [ -d "${3:-}" ] || fail "give EVAL_DIR and CALIB_DIR (the image folders make takes)"
    mkdir -p "$OUT/data"
    tar -chf - -C "$2" --transform 's,^\.,val2017-eval,' . | split_into "$OUT/data/eval.tar"
    tar -chf - -C "$3" --transform 's,^\.,calib,' . | split_into "$OUT/data/calib.tar" ;;
  quant)
    records="${2:-}/${3:-}/onnxrt"
    ls "$records"/*.json >/dev/null 2>&1 ||
      fail "no records in $records: run make sweep RESULTS=${2:-DIR} TRT_VERSION=8.6.1 SWEEP_ARGS='--stages cpu' first"
    names="import json, sys; print(*sorted({json.load(open(f))['onnx'] for f in sys.argv[1:]}), sep='\n')"
    # what git tracks is in the working tree every call carries already (the shipped yolo11n.onnx)
    models=$(for m in $(python3 -c "$names" "$records"/*.json); do git ls-files --error-unmatch "$m" >/dev/null 2>&1 ||
               echo "$m"; done)
    mkdir -p "$OUT/data"
    for m in $models; do [ -f "$m" ] || fail "$m (named in $records) is missing: run the CPU stages again"; done
    tar -cf - $models $(for m in $models; do [ ! -f "${m%.onnx}.json" ] || echo "${m%.onnx}.json"; done) |
      split_into "$OUT/data/quant.tar" ;;
  engines)
    shift
    [ $# -gt 0 ] || fail "give the folders the engines.tar.* parts came back in, in order"
    mkdir -p "$OUT/data"
    cat $(for d in "$@"; do ls "$d"/engines.tar.[0-9][0-9]; done) | split_into "$OUT/data/engines.tar" ;;
  -h|--help) sed -n '2,14p' "$0" ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
