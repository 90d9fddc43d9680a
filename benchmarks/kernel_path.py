"""Cost of each CPU kernel path on the embedded default, and whether its weights depend on the thread count.

Each path runs in fresh child processes (the kernel path is fixed when torch first dispatches), on the same tiny
model and batches: SFT training steps, then greedy generation. The script prints, as JSON, the time per step and per
generated token relative to the machine's default path (at ``--threads``), and a digest of the trained weights at
each of ``--compare-threads``: ``thread_invariant`` is true when they are bit-identical. ``reproducible`` is
``SELFDESTRUCT_REPRODUCIBLE=1``; ``threads`` is ``SELFDESTRUCT_REPRODUCIBLE=threads`` (the machine's kernels, MKL in its
strict conditional reproducibility mode, ``MKL_CBWR=AUTO,STRICT``).

    python benchmarks/kernel_path.py [--steps 30] [--threads 1] [--compare-threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from selfdestruct.utils import kernel_path

PATHS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "reproducible": {"SELFDESTRUCT_REPRODUCIBLE": "1"},
    "threads": {"SELFDESTRUCT_REPRODUCIBLE": "threads"},
}
# What a child's environment may not inherit from this one: only ``PATHS`` and ``threads`` choose its path and threads.
KERNEL_VARIABLES = (kernel_path.VARIABLE, *kernel_path.MODE_VARIABLES, "OMP_NUM_THREADS", "MKL_NUM_THREADS")

CHILD = r"""
import hashlib, json, os, statistics, sys, time
import selfdestruct  # applies SELFDESTRUCT_REPRODUCIBLE before torch is imported
import torch
from selfdestruct.utils.kernel_path import MODE_VARIABLES
from selfdestruct.models.tiny import TinyLlamaConfig, build_tiny_llama

steps, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)

class Tok:  # the model builder only reads these
    vocab_size, pad_token_id, bos_token_id, eos_token_id = 1024, 0, 1, 2
    def __len__(self): return 1024

model = build_tiny_llama(TinyLlamaConfig(), Tok(), 0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = torch.randint(3, 1024, (32, 64))
times = []
for i in range(steps + 5):
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if i >= 5:
        times.append(time.perf_counter() - start)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().contiguous().numpy().tobytes())
model.eval()
prompts = torch.randint(3, 1024, (64, 16))
with torch.no_grad():
    start = time.perf_counter()
    model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, min_new_tokens=32,
                   do_sample=False, pad_token_id=0)
    gen = (time.perf_counter() - start) / 32
print(json.dumps({"step_s": statistics.median(times), "token_s": gen, "weights": digest.hexdigest()[:16],
                  "capability": torch.backends.cpu.get_cpu_capability(),
                  "kernel_env": {k: os.environ.get(k) for k in MODE_VARIABLES}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="the thread count the times are measured at")
    parser.add_argument("--compare-threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts whose trained weights are compared (bit for bit)")
    args = parser.parse_args()
    counts = sorted({args.threads, *args.compare_threads})
    results = {}
    for name, env in PATHS.items():
        runs = {t: child(args.steps, t, env) for t in counts}
        timed = runs[args.threads]
        results[name] = {"capability": timed["capability"], "step_s": timed["step_s"], "token_s": timed["token_s"],
                         "weights": {str(t): runs[t]["weights"] for t in args.compare_threads},
                         "thread_invariant": len({runs[t]["weights"] for t in args.compare_threads}) == 1}
    base = results["default"]
    for r in results.values():
        r["step_ratio_vs_default"] = round(r["step_s"] / base["step_s"], 3)
        r["token_ratio_vs_default"] = round(r["token_s"] / base["token_s"], 3)
    print(json.dumps({"threads": args.threads, "steps": args.steps, "paths": results}, indent=1))


def child(steps: int, threads: int, env: dict[str, str]) -> dict:
    """One run in a fresh process: only ``env`` chooses its kernel path, ``threads`` its thread count."""
    clean = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(threads)], check=True, capture_output=True,
                         text=True, env={**clean, **env, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
