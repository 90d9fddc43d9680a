"""How many small training processes one GPU serves: steps per second with K processes at once, with and without
CUDA MPS (the multi-process service, which lets kernels of several processes run side by side).

The embedded models are bound by kernel launches, not arithmetic, so a lab running a sweep puts many jobs on one
GPU (experiments/scale/run.py ran 18). This measures what that buys: each of K child processes trains the tiny
Llama (full fine-tuning step, AdamW, batch 10 x 48 tokens, the size of a CTRAP batch) for ``--seconds`` after a
common start, and the script prints per-process and total steps per second, and the total relative to one process
alone, as JSON; then the same with MPS when ``--mps`` is given (started and stopped by the script; needs root).

    python benchmarks/gpu_sharing.py [--procs 1 6 18] [--seconds 10] [--model tiny|medium] [--mps]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
from selfdestruct.models.tiny import TinyLlamaConfig, build_tiny_llama

start_at, seconds, arch, device = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)

class Tok:  # the model builder only reads these
    vocab_size, pad_token_id, bos_token_id, eos_token_id = 1024, 0, 1, 2
    def __len__(self): return 1024

model = build_tiny_llama(TinyLlamaConfig(**arch), Tok(), 0).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
batch = torch.randint(3, 1024, (10, 48), device=device)

def step():
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

for _ in range(3):  # warm-up: kernels chosen, allocator filled
    step()
torch.cuda.synchronize() if device == "cuda" else None
while time.time() < start_at:
    time.sleep(0.01)
steps, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    step()
    steps += 1
torch.cuda.synchronize() if device == "cuda" else None
print(json.dumps({"steps": steps, "seconds": time.perf_counter() - t0}))
"""

MODELS = ("tiny", "small", "medium")  # conf/model options built from config


def architecture(model: str) -> dict:
    """The architecture fields of ``conf/model/<model>.yaml``."""
    from dataclasses import fields

    import yaml

    from selfdestruct import CONF_DIR
    from selfdestruct.models.tiny import TinyLlamaConfig

    data = yaml.safe_load((Path(CONF_DIR) / "model" / f"{model}.yaml").read_text())
    return {f.name: data[f.name] for f in fields(TinyLlamaConfig) if f.name in data}


def run(procs: int, seconds: float, model: str, device: str, env: dict) -> dict:
    arch = json.dumps(architecture(model))
    start_at = time.time() + 10 + 0.4 * procs  # every child built and warmed up before the common start
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(start_at), str(seconds), arch, device],
                                 stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    results = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
    rates = [r["steps"] / r["seconds"] for r in results]
    return {"procs": procs, "steps_per_s_per_proc": round(sum(rates) / len(rates), 2),
            "steps_per_s_total": round(sum(rates), 2)}


def mps(action: str, pipe_dir: str) -> None:
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir, "CUDA_MPS_LOG_DIRECTORY": pipe_dir}
    if action == "start":
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True)
        time.sleep(1)
    else:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 6, 18])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--mps", action="store_true", help="also measure with CUDA MPS (root; started and stopped)")
    parser.add_argument("--device", default="cuda", help="cuda | cpu (cpu: a dry run of the script itself)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    modes = [("plain", env)]
    pipe_dir = tempfile.mkdtemp(prefix="mps-")
    if args.mps:
        modes.append(("mps", {**env, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir}))
    out = {"model": args.model, "seconds": args.seconds}
    for name, mode_env in modes:
        try:
            if name == "mps":
                mps("start", pipe_dir)
            rows = [run(k, args.seconds, args.model, args.device, mode_env) for k in args.procs]
        except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        finally:
            if name == "mps":
                mps("stop", pipe_dir)
        single = rows[0]["steps_per_s_total"]
        for row in rows:
            row["total_vs_first"] = round(row["steps_per_s_total"] / single, 2)
        out[name] = rows
        print(json.dumps({name: rows}), flush=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
