#!/bin/bash
# background driver: phase 1 concurrency, phase 2 in-process cache, phase 3 bench + profile fixtures
source /tmp/kit/env.sh
cd "$(dirname "$0")/../.."
E=.devdata/exp; O=/tmp/exp; mkdir -p $O/c1 $O/c2 $O/c3 $O/c4 $O/s
Q=.devdata/exp/q.onnx; F=.devdata/exp/yolo11n.onnx
export PYTHONPATH=$PWD
(nvidia-smi dmon -s u -d 5 > $O/dmon.txt 2>&1 &)
(while true; do echo "$(date +%s) $(cat /proc/loadavg)" >> $O/load.txt; sleep 5; done &)
{ nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $O/machine.txt
echo "phase1 start $(date +%s)" >> $O/phases.txt
for i in 1 2 3 4; do py311 $E/exp_build.py $O/c$i 1 c$i:$Q:fp16+int8:32 > $O/c$i/log.txt 2>&1 & done
wait
echo "phase2 start $(date +%s)" >> $O/phases.txt
py311 $E/exp_build.py $O/s 1 q32:$Q:fp16+int8:32 q32again:$Q:fp16+int8:32 q1:$Q:fp16+int8:1 f32L0:$F:fp16:32 > $O/s/log.txt 2>&1
echo "phase3 start $(date +%s)" >> $O/phases.txt
for e in c1/c1 c2/c2 c3/c3 c4/c4 s/q32 s/q32again; do
  py311 -m tools.trtexec_py --loadEngine=$O/$e.engine --shapes=images:32x3x640x640 --noDataTransfers --useCudaGraph --warmUp=300 --duration=2 > $O/$(echo $e|tr / _).bench.txt 2>&1
done
py311 $E/exp_profile.py $O/s/q32.engine 32 $O/q32 > $O/profile_log.txt 2>&1
py311 $E/exp_profile.py $O/s/f32L0.engine 32 $O/f32L0 >> $O/profile_log.txt 2>&1
echo "done $(date +%s)" >> $O/phases.txt
