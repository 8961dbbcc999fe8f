#!/usr/bin/env bash
# The single-GPU checks and measurements of a session, in one call (device time is scarce): the GPU
# tests, the layer grid, the training step and the kernel-switch A/B. Each part is timed out on its
# own and logs to $OUT (or ./out); a part that fails does not stop the others.
#
#   here:   moec build bench/specs/*.yaml --out-dir bench/generated
#   there:  bash bench/run_all.sh [tests] [layer] [train] [switches] [regimes] [spread] [profile] [ncu]
#           (carry bench/generated; no arguments = the first four, ~9 minutes on an H200: one
#           call's limit is 10)
set -uo pipefail

out="${OUT:-out}"
mkdir -p "$out"
parts=("$@")
NCU_CELLS=()  # NCU_CELLS_ARG="--cells olmoe:256" picks the cells of the ncu part
[ -n "${NCU_CELLS_ARG:-}" ] && read -r -a NCU_CELLS <<< "$NCU_CELLS_ARG"
[ ${#parts[@]} -eq 0 ] && parts=(tests layer train switches)

run() {  # run NAME SECONDS COMMAND...: log to $out/NAME.log, one status line to run_all.log
  local name="$1" seconds="$2"
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - start)) s" | tee -a "$out/run_all.log"
}

for part in "${parts[@]}"; do
  case "$part" in
    tests) run gpu_tests 330 python3 -m pytest -m gpu tests/gpu --noconftest -q -p no:cacheprovider ;;
    layer) run moe_layer 170 python3 bench/moe_layer.py ;;
    train) run train_step 120 python3 bench/moe_train_step.py ;;
    switches) run kernel_switches 180 python3 bench/kernel_switches.py --switch quarter_tails --rounds 3 ;;
    regimes) run tile_regimes 240 python3 bench/tile_regimes.py ;;  # not in the default four
    spread) run routing_spread 150 python3 bench/routing_spread.py ;;  # not in the default four
    profile) run path_profile 120 python3 bench/path_profile.py ;;  # not in the default four
    ncu)  # not in the default four: Nsight Compute's counters of the expert path's kernels
      run ncu 420 ncu --clock-control none --profile-from-start off --set full -f -o "$out/path" \
        --metrics lts__ltcfabric2ltc_cycles_active.avg.pct_of_peak_sustained_elapsed \
        python3 bench/ncu_path.py --dense "${NCU_CELLS[@]}"
      ncu --import "$out/path.ncu-rep" --page details > "$out/ncu_details.txt" 2>&1
      ncu --import "$out/path.ncu-rep" --page raw --csv > "$out/ncu_raw.csv" 2>&1
      python3 bench/ncu_summary.py "$out/ncu_raw.csv" | tee "$out/ncu_summary.md" ;;
    *) echo "unknown part $part (tests, layer, train, switches, regimes, spread, profile, ncu)" | tee -a "$out/run_all.log" ;;
  esac
done
tail -n 4 "$out"/*.log
