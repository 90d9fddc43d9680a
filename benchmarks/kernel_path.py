"""Cost of each CPU kernel path on the embedded default: SFT training steps and greedy generation.

Each path runs in a fresh child process (the kernel path is fixed when torch first dispatches), on the same
tiny model, batch and thread count; the script prints the time per step and per generated token relative to
the machine's default path, as JSON. ``reproducible`` is ``SELFDESTRUCT_REPRODUCIBLE=1``.

    python benchmarks/kernel_path.py [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PATHS = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "reproducible": {"SELFDESTRUCT_REPRODUCIBLE": "1"},
}

CHILD = r"""
import json, statistics, sys, time
import selfdestruct  # applies SELFDESTRUCT_REPRODUCIBLE before torch is imported
import torch
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
model.eval()
prompts = torch.randint(3, 1024, (64, 16))
with torch.no_grad():
    start = time.perf_counter()
    model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, min_new_tokens=32,
                   do_sample=False, pad_token_id=0)
    gen = (time.perf_counter() - start) / 32
print(json.dumps({"step_s": statistics.median(times), "token_s": gen,
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    results = {}
    for name, env in PATHS.items():
        child_env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), str(args.threads)], check=True,
                             capture_output=True, text=True, env={**child_env, **env})
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["default"]
    for name, r in results.items():
        r["step_ratio_vs_default"] = round(r["step_s"] / base["step_s"], 3)
        r["token_ratio_vs_default"] = round(r["token_s"] / base["token_s"], 3)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
