#!/bin/bash
# Does this machine's kernel path give the same weights at 1 and at 2 torch threads? Pre-training and alignment (SFT's
# defend) of one seed at each thread count, each in a fresh cache, one after the other; then the base and aligned
# weights compared byte for byte and each run's aligned utility:
#   bash experiments/thread_invariance.sh OUT [SEED]                                    # the machine's default path
#   SELFDESTRUCT_REPRODUCIBLE=threads bash experiments/thread_invariance.sh OUT [SEED]  # MKL's strict reproducibility
# Into OUT/sft_t{1,2} (runs), OUT/cache_t{1,2} (their caches) and OUT/invariance.txt (the verdict, as printed).
set -euo pipefail
out=$(realpath -m "$1"); seed=${2:-0}
mkdir -p "$out"
for threads in 1 2; do
  start=$(date +%s)
  SELFDESTRUCT_CACHE="$out/cache_t$threads" OMP_NUM_THREADS=$threads python -m selfdestruct.defend defense=sft \
    seed="$seed" trainer.progress_bar=false hydra.run.dir="$out/sft_t$threads" > "$out/sft_t$threads.log" 2>&1
  echo "$threads thread(s): $(( $(date +%s) - start )) s" >&2
done
{
  echo "seed $seed, SELFDESTRUCT_REPRODUCIBLE=${SELFDESTRUCT_REPRODUCIBLE:-unset}"
  for stage in base align; do
    one=$(ls "$out"/cache_t1/$stage/*/model/model.safetensors)
    two=$(ls "$out"/cache_t2/$stage/*/model/model.safetensors)
    if cmp -s "$one" "$two"; then verdict="the same weights at 1 and 2 threads"; else verdict="other weights at 2 threads than at 1"; fi
    echo "$stage: $verdict (sha256 $(sha256sum "$one" | cut -c1-12) and $(sha256sum "$two" | cut -c1-12))"
  done
  for threads in 1 2; do
    python -c "import json, sys; m = json.load(open(sys.argv[1])); e = m['environment']
kernel = ''.join(f'; {k}={v}' for k, v in sorted(e.get('env', {}).items()) if k != 'OMP_NUM_THREADS')
print(f\"aligned utility at {sys.argv[2]} thread(s): {m['pre']['utility']:.3f} (torch threads {e['torch_threads']}{kernel})\")" \
      "$out/sft_t$threads/metrics.json" "$threads"
  done
} | tee "$out/invariance.txt"
