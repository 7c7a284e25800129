#!/usr/bin/env bash
# The three-shape speed table of issue #16 (bench/RESULTS.md): the peer (transformers + PEFT,
# torch.compile) and ours (full FT, MoDE 2x, LoRA r16), random weights, batch 16 x 1024, bf16, on
# one warm GPU, the peer's process first so torch and JAX never share the device. Ours profiles
# each train step (bench/profile_summary.py: where the GPU time goes).
#
#   bash bench/shapes.sh OUT peer  SHAPE...   # peer rows:  OUT/peer_<shape>.jsonl
#   bash bench/shapes.sh OUT ours  SHAPE...   # our rows:   OUT/ours_<shape>.jsonl (+ .txt: the table
#                                             # and profile summary), ratios against OUT/peer_<shape>.jsonl
#
# The two halves are separate so that a machine with a 10-minute command limit runs them in
# separate calls (peer: ~1-3 min a shape, most of it torch.compile; ours: ~1-2 min a shape).
# SHAPE: 135m, 360m, 1.7b (bench/shapes.py). STEPS / WARMUP / PEAK (TFLOP/s for MFU) override;
# the raw traces go to $TRACES/profile-<shape> (default /tmp: they are large), their summary to the .txt.
set -euo pipefail
out=$1; what=$2; shift 2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
steps=${STEPS:-8}; warmup=${WARMUP:-3}; peak=${PEAK:-989}
mkdir -p "$out"
for shape in "$@"; do
  case $what in
    peer)
      python3 "$here/peer_hf.py" --shape "$shape" --steps "$steps" --warmup "$warmup" \
          --out "$out/peer_$shape.jsonl" ;;
    ours)
      python3 "$here/gpu_train.py" --shape "$shape" --parts full,mode,lora --steps "$steps" \
          --warmup "$warmup" --no-check --peak-tflops "$peak" --peer-json "$out/peer_$shape.jsonl" \
          --json "$out/ours_$shape.jsonl" --profile "${TRACES:-/tmp}/profile-$shape" 2>&1 | tee "$out/ours_$shape.txt" ;;
    *) echo "shapes.sh: the second argument is 'peer' or 'ours', not '$what'" >&2; exit 2 ;;
  esac
done
