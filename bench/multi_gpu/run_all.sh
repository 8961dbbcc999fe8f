#!/usr/bin/env bash
# Every 2-GPU measurement of the generated expert-parallel runtime, in one call (device time is
# scarce): NCCL smoke test against one process, phase times against the plan's predictions for one
# chunk and for the pipelined schedule, and the all-to-all against a raw all_to_all_single.
#
#   here:   moec build bench/multi_gpu/mixtral_ep2.yaml -o bench/multi_gpu/generated/mixtral_ep2
#           moec build bench/multi_gpu/mixtral_ep2_chunks4.yaml --out-dir bench/generated
#   there:  bash bench/multi_gpu/run_all.sh   (carry bench/generated; logs go to $OUT or ./out)
#
# `launch/torchrun.sh bench` prints each phase's median (dispatch / experts / combine in one chunk,
# and the whole forward on the plan's schedule); compare with `moec plan` of the same spec with
# workload.tokens_per_rank = T.
set -uo pipefail

out="${OUT:-out}"
mkdir -p "$out"
pkgs=(bench/multi_gpu/generated/mixtral_ep2 bench/generated/mixtral_ep2_chunks4)

for pkg in "${pkgs[@]}"; do
  name="$(basename "$pkg")"
  if [ ! -d "$pkg" ]; then
    echo "missing $pkg: build it first (see the top of this script)" | tee -a "$out/run_all.log"
    continue
  fi
  timeout 120 bash "$pkg/launch/torchrun.sh" smoke --dtype bfloat16 --tokens 512 \
    > "$out/${name}_smoke.log" 2>&1
  echo "$name smoke rc=$?" | tee -a "$out/run_all.log"
  for tokens in 512 4096 16384; do
    timeout 150 bash "$pkg/launch/torchrun.sh" bench --dtype bfloat16 --tokens "$tokens" \
      --repeat 20 > "$out/${name}_bench_${tokens}.log" 2>&1
    echo "$name bench T=$tokens rc=$?" | tee -a "$out/run_all.log"
  done
done

timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
  bench/multi_gpu/a2a_vs_raw.py bench/multi_gpu/generated/mixtral_ep2 --out "$out" \
  > "$out/a2a_vs_raw.log" 2>&1
echo "a2a_vs_raw rc=$?" | tee -a "$out/run_all.log"
tail -n 5 "$out"/*.log
