"""Cost of one SEAM step (forward scheme) and one CTRAP step (first order) against one SFT step (issue 3, item 5).

Time: the three steps run interleaved on identical model copies and the same batch (every SEAM/CTRAP stream is
that batch), after warm-up, with a fixed number of CPU threads; the median of ``--repeats`` is reported. The
ratios compare the gradient computation (what the floor counts: forward and backward passes); ``*_step_ratio``
also include the AdamW update, which costs the same for every method and dilutes the ratio when parameters
dominate.

Floors (the arithmetic the method cannot avoid, relative to SFT's 1 forward + 1 backward = 3 forward units):
- SEAM: 17/3 passes (harmful forward shared by L_ul and g_a with two backward passes, refusal, benign, and two
  perturbed gradient evaluations) plus the logit lens: L+1 extra vocabulary projections of the labelled rows,
  forward and backward, priced from the model's shapes.
- CTRAP: 3 (harmful, look-ahead collapse, alignment gradient). With the per-step look-ahead harmful loss the
  CTRAP module logs by default, one more forward (``ctrap_logged_*``).

The floors leave out what is proportional to the parameter count rather than to the tokens: the methods' norms,
dot products, weight copies and shifts (SEAM about a dozen parameter-sized passes per step, CTRAP about six).
They are negligible on ``--model tiny`` at a training-sized batch, where time is judged; on ``--model wide``
(32 tokens per batch) one such pass costs about a third of a forward, so the wide time ratios exceed the floor.

Memory: each method runs a few steps in a fresh child process; its peak RSS (VmHWM, reset after the imports)
above the RSS the child had before building the model (imports and the batch) is compared. On ``--model wide``
parameters dominate activations, so SFT holds about 4 parameter-sized buffers (weights, gradients, two AdamW
moments), SEAM 3 more (g_a, g_b, the saved weights: 1.75×) and CTRAP 2 more (g_h, the saved weights: 1.5×).
Children run with a fixed glibc mmap threshold, so every large tensor goes back to the system when freed and
the peak RSS is the peak of live memory, not of allocator caching. On CUDA, ``torch.cuda.max_memory_allocated``
is used instead.

    python benchmarks/step_cost.py --model tiny
    python benchmarks/step_cost.py --model wide
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selfdestruct.objectives.ctrap import CtrapParams, ctrap_step
from selfdestruct.objectives.seam import SeamParams, seam_step

METHODS = ("sft", "seam", "ctrap")
TARGET_TIME = 1.10  # time ratio ≤ 1.10 × floor
TARGET_MEMORY = {"seam": 1.75, "ctrap": 1.5}
COLLAPSE_TOKEN = 7


@dataclass(frozen=True)
class Shape:
    """A Llama and the batch it is measured on (``response`` labelled tokens at the end of each row)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int
    response: int


MODELS = {
    "tiny": Shape(128, 352, 4, 4, 1024, batch=16, seq=64, response=48),  # conf/model/tiny.yaml, a training batch
    "wide": Shape(768, 2048, 4, 8, 1024, batch=2, seq=16, response=8),  # ~30 M parameters, 32 tokens per batch
}


def build(shape: Shape, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, max_position_embeddings=max(shape.seq, 64),
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device)


def make_batch(shape: Shape, device: str) -> dict[str, torch.Tensor]:
    """Random tokens, loss on the last ``response`` positions (a prompt/response layout without padding)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape.vocab, (shape.batch, shape.seq), generator=gen)
    labels = ids.clone()
    labels[:, : shape.seq - shape.response] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


# ---- the three steps: gradient part and optimiser part kept apart so both can be timed ---------------------


def gradient_fn(method: str, model: torch.nn.Module, batch: dict, measure_lookahead: bool = False) -> Callable:
    """The gradient computation of one step; every stream of SEAM and CTRAP is the SFT batch."""
    if method == "sft":
        def run() -> None:
            model(**batch, use_cache=False).loss.backward()
    elif method == "seam":
        def run() -> None:
            seam_step(model, batch, batch, batch, SeamParams(alpha=1.0, beta=0.01, eps=1e-3, estimator="forward"))
    else:
        def run() -> None:
            p = CtrapParams(lam=0.1, step_size=0.1, measure_lookahead=measure_lookahead)
            ctrap_step(model, batch, batch, batch, p, token_id=COLLAPSE_TOKEN)
    return run


class Stepper:
    """One method on its own model copy with its own AdamW: ``grad()`` then ``update()`` is one training step."""

    def __init__(self, method: str, model: torch.nn.Module, batch: dict, measure_lookahead: bool = False) -> None:
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        self._grad = gradient_fn(method, model, batch, measure_lookahead)

    def grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._grad()

    def update(self) -> None:
        self.opt.step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(shape: Shape, device: str, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    base, batch = build(shape, device), make_batch(shape, device)
    steppers = {m: Stepper(m, copy.deepcopy(base), batch) for m in METHODS}
    steppers["ctrap_logged"] = Stepper("ctrap", copy.deepcopy(base), batch, measure_lookahead=True)
    del base
    times: dict[str, dict[str, list[float]]] = {m: {"grad": [], "step": []} for m in steppers}
    for i in range(warmup + repeats):
        for name, s in steppers.items():  # interleaved, so a load change on the machine hits every method alike
            _sync(device)
            t0 = time.perf_counter()
            s.grad()
            _sync(device)
            t1 = time.perf_counter()
            s.update()
            _sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                times[name]["grad"].append(t1 - t0)
                times[name]["step"].append(t2 - t0)
    return {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}


# ---- floors from the model's shapes ------------------------------------------------------------------------


def forward_flops(shape: Shape) -> tuple[float, float]:
    """(FLOPs of one forward pass on the batch, FLOPs of SEAM's logit lens forward + backward)."""
    h, tokens = shape.hidden, shape.batch * shape.seq
    per_layer = 2 * (4 * h * h + 3 * h * shape.intermediate) * tokens + 4 * shape.batch * shape.seq**2 * h
    forward = shape.layers * per_layer + 2 * h * shape.vocab * tokens  # the LM head projects every position
    labelled = shape.batch * shape.response  # rows whose next token is labelled (the last prompt position too)
    lens = 3 * (shape.layers + 1) * 2 * labelled * h * shape.vocab  # L+1 projections, forward (1) + backward (2)
    return float(forward), float(lens)


def floors(shape: Shape) -> dict[str, float]:
    forward, lens = forward_flops(shape)
    return {"seam": 17 / 3 + lens / (3 * forward), "ctrap": 3.0, "ctrap_logged": 10 / 3,
            "lens_fraction_of_sft": lens / (3 * forward)}


# ---- memory: one child process per method ------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Forget the peak RSS so far (Linux ≥ 4.0): the import of torch peaks higher than a small model's steps."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(method: str, shape: Shape, device: str, steps: int) -> dict[str, float]:
    """Peak memory of ``steps`` steps of ``method`` (or of building the model alone), above the pre-model level."""
    cuda = device.startswith("cuda")
    batch = make_batch(shape, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
    model = build(shape, device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if method != "model":
        s = Stepper(method, model, batch)
        for _ in range(steps):
            s.grad()
            s.update()
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")) - before
    return {"peak_bytes": float(peak), "param_bytes": float(params)}


def memory(shape: Shape, device: str, threads: int, steps: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    out = {}
    for method in ("model", *METHODS):
        cmd = [sys.executable, __file__, "--child", method, "--shape", json.dumps(dataclasses.asdict(shape)),
               "--device", device, "--threads", str(threads), "--steps", str(steps)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ---- main --------------------------------------------------------------------------------------------------


def report(shape: Shape, t: dict, mem: dict | None, args: argparse.Namespace) -> dict[str, object]:
    fl = floors(shape)
    sft_t = t["sft"]
    result: dict[str, object] = {"model": args.model, "device": args.device, "threads": args.threads,
                                 "repeats": args.repeats, "shape": dataclasses.asdict(shape)}
    for m in ("seam", "ctrap", "ctrap_logged"):
        ratio = t[m]["grad"] / sft_t["grad"]
        result[f"{m}_time_ratio"] = round(ratio, 3)
        result[f"{m}_time_floor"] = round(fl[m], 3)
        result[f"{m}_time_vs_floor"] = round(ratio / fl[m], 3)
        result[f"{m}_step_ratio"] = round(t[m]["step"] / sft_t["step"], 3)
    for m in ("seam", "ctrap"):
        result[f"{m}_time_target_met"] = result[f"{m}_time_vs_floor"] <= TARGET_TIME
        if mem is not None:
            result[f"{m}_memory_ratio"] = round(mem[m]["peak_bytes"] / mem["sft"]["peak_bytes"], 3)
            result[f"{m}_memory_target_met"] = result[f"{m}_memory_ratio"] <= TARGET_MEMORY[m]
    result["lens_fraction_of_sft"] = round(fl["lens_fraction_of_sft"], 3)
    result["seconds"] = {m: {k: round(v, 5) for k, v in d.items()} for m, d in t.items()}
    if mem is not None:
        result["param_bytes"] = mem["model"]["param_bytes"]
        result["peak_in_param_buffers"] = {m: round(mem[m]["peak_bytes"] / mem["model"]["param_bytes"], 2)
                                           for m in ("model", *METHODS)}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for comparable timings)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per memory child (AdamW state exists from 1 on)")
    parser.add_argument("--batch", type=int, help="rows per batch instead of the model's default")
    parser.add_argument("--seq", type=int, help="tokens per row instead of the model's default (response: 3/4)")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--child", choices=("model", *METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, Shape(**json.loads(args.shape)), args.device, args.steps)))
        return
    shape = MODELS[args.model]
    if args.batch:
        shape = dataclasses.replace(shape, batch=args.batch)
    if args.seq:
        shape = dataclasses.replace(shape, seq=args.seq, response=max(1, 3 * args.seq // 4))
    t = time_steps(shape, args.device, args.repeats, args.warmup)
    mem = None if args.no_memory else memory(shape, args.device, args.threads, args.steps)
    print(json.dumps(report(shape, t, mem, args)))


if __name__ == "__main__":
    main()
