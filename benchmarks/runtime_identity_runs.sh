#!/usr/bin/env bash
# Fixed-seed runs for a before/after identity check (issue 32): run this script with the
# vqkit of each commit installed, into two directories, then compare them with
#   python -m benchmarks.runtime_identity BEFORE AFTER --out benchmarks/results/runtime_identity
# (and --cross DIR: the new code's `vqkit sample` / `vqkit compress` of BEFORE's runs).
# $1: the output directory (replaced).
set -euo pipefail
O=$1; rm -rf "$O"; mkdir -p "$O"
export OMP_NUM_THREADS=1 VQKIT_CACHE=$O/cache PYTHONHASHSEED=0
V="--no-progress"
vqkit train --out $O/mse --steps 40 --log-every 5 --eval-every 20 --eval-images 200 --batch-size 16 $V > $O/mse.log 2>&1
vqkit train --out $O/adv --preset vqgan --steps 40 --disc-start 20 --log-every 5 --eval-every 20 --eval-images 200 --batch-size 8 $V > $O/adv.log 2>&1
vqkit prior --tokenizer $O/mse --out $O/ar --steps 30 --log-every 5 --eval-every 15 --n-layer 2 --n-embd 64 --n-head 2 --eval-sequences 100 --num-samples 4 --batch-size 16 $V > $O/ar.log 2>&1
vqkit prior --tokenizer $O/mse --out $O/mk --kind masked --steps 30 --log-every 5 --eval-every 15 --n-layer 2 --n-embd 64 --n-head 2 --eval-sequences 100 --num-samples 4 --batch-size 16 $V > $O/mk.log 2>&1
vqkit sample $O/ar --num 4 --out $O/ar_samples > $O/ars.log 2>&1
vqkit sample $O/mk --num 4 --out $O/mk_samples > $O/mks.log 2>&1
vqkit compress --prior $O/ar --out $O/vqz $O/ar_samples/sample_*.png > $O/cmp.log 2>&1
echo done
