#!/bin/bash
# README command 1 measurement: GEMM GFLOP/s, then default run, then shorter runs
cd /work/wt/h25
export PYTHONPATH=/work/wt/h25/src OMP_NUM_THREADS=${T:-1} MKL_NUM_THREADS=${T:-1}
PY=/work/main/.venv/bin/python
gemm() { $PY - <<'P'
import time, torch
a=torch.randn(1024,1024); b=torch.randn(1024,1024)
for _ in range(3): a@b
best=0
for _ in range(5):
    t=time.perf_counter(); 
    for _ in range(10): a@b
    dt=time.perf_counter()-t; best=max(best, 10*2*1024**3/dt/1e9)
print(f"gemm fp32 1024^3 threads={torch.get_num_threads()} best {best:.1f} GFLOP/s")
P
}
for steps in ${STEPS:-default}; do
  gemm
  out=/tmp/h25/q_$steps
  extra=""; [ "$steps" != default ] && extra="--steps $steps"
  s=$(date +%s.%N)
  /usr/bin/time -v $PY -m vqkit train --out $out --overwrite --no-progress $extra > $out.log 2>&1
  e=$(date +%s.%N)
  echo "steps=$steps wall $(echo "$e - $s" | bc) s"
  gemm
  cat $out/eval.json 2>/dev/null | tr -d '\n '; echo
done
