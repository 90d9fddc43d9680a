#!/usr/bin/env bash
# A lent GPU machine with no package registry, one bounded call (the third H200 lease's procedure):
#   bash experiments/scale/gpu_lease.sh prepare            # here: the wheels that machine's image lacks, at the lock's versions
#   BUDGET=520 bash experiments/scale/gpu_lease.sh run ARGS   # there (carry .devwheels): wheels, the CUDA-only tests
#                                                            # beside bounded_gpu.sh $OUT/runs.tgz ARGS, deadline from BUDGET
# `prepare` writes .devwheels/ (git-ignored through .git/info/exclude); `run` writes $OUT/tests.log and $OUT/runs.tgz.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
wheels=$root/.devwheels
case ${1:-} in
  prepare)
    grep -qx '.devwheels/' "$root/.git/info/exclude" 2>/dev/null || echo '.devwheels/' >> "$root/.git/info/exclude"
    pins=$(grep -E '^(hydra-core|omegaconf|peft|tokenizers)==' "$root/requirements/lock.txt")
    python -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
      --platform manylinux2014_x86_64 $pins -d "$wheels"
    python -m pip wheel -q --no-deps "$(grep '^antlr4-python3-runtime==' "$root/requirements/lock.txt")" -w "$wheels"
    ls "$wheels" ;;
  run)
    shift
    cd "$root"
    t0=$SECONDS
    python3 -m pip install -q --no-deps --no-index "$wheels"/*.whl
    export PYTHONPATH=$root/src PYTHONUNBUFFERED=1 WANDB_MODE=disabled
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
    (timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_pipeline.py \
      -k "test_gpu or trainer" > "$OUT/tests.log" 2>&1; echo "pytest rc=$?" >> "$OUT/tests.log") &
    tests=$!
    deadline=$(( ${BUDGET:-520} - (SECONDS - t0) ))
    echo "study deadline ${deadline}s"
    bash experiments/scale/bounded_gpu.sh outputs/scale_gpu "$OUT/runs.tgz" "$@" --deadline-s "$deadline"
    wait $tests
    tail -3 "$OUT/tests.log" ;;
  *) echo "usage: $0 prepare | run RUN_PY_ARGS (see the header)" >&2; exit 2 ;;
esac
