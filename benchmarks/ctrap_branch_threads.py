"""CTRAP's radii on several threads (``trainer.branch_threads``) against one thread: time of a step and equality.

``conf/defense/ctrap_tuned``'s objective (two radii, four unrolled sign steps, the trap after each: 16 forward-
backward passes a step, 14 of them in the radii) on the embedded default's shape and a training batch. Two copies
of the model take the same steps, interleaved, one with the radii in sequence and one with them on ``--threads``
threads (a replica per extra thread); each step's gradients are compared bit for bit and the median step time of
``--repeats`` is reported, as a ratio measured side by side in one run. Torch runs one intra-op thread, as in the
quickstart's jobs; an idle machine with at least ``--threads`` cores is assumed (else the ratio measures sharing).

    python benchmarks/ctrap_branch_threads.py
    python benchmarks/ctrap_branch_threads.py --threads 2 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from selfdestruct import CONF_DIR
from selfdestruct.objectives.ctrap import ctrap_step, make_replicas
from selfdestruct.pipeline.defense import parse_params

SHAPE = dict(hidden=128, intermediate=352, layers=4, heads=4, vocab=1024)  # conf/model/tiny.yaml
BATCH, SEQ, RESPONSE = 10, 64, 40  # ctrap_tuned's batch size; a prompt/response layout without padding
COLLAPSE_TOKEN = 7


def tuned_params():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="defend", overrides=["defense=ctrap_tuned"])
    return parse_params("ctrap", cfg.defense.params)


def build() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                         num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                         num_key_value_heads=SHAPE["heads"], max_position_embeddings=128, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SHAPE["vocab"], (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : SEQ - RESPONSE] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    p = tuned_params()
    one = build()
    many = copy.deepcopy(one)
    replicas = make_replicas(many, p, args.threads)
    optimisers = {name: torch.optim.AdamW(m.parameters(), lr=3e-4) for name, m in (("one", one), ("many", many))}
    times: dict[str, list[float]] = {"one": [], "many": []}
    identical = True
    for i in range(args.warmup + args.repeats):
        align, harmful, general = batch(3 * i), batch(3 * i + 1), batch(3 * i + 2)
        grads = {}
        for name, model, reps in (("one", one, []), ("many", many, replicas)):  # interleaved: load hits both alike
            optimisers[name].zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            ctrap_step(model, align, harmful, general, p, token_id=COLLAPSE_TOKEN, replicas=reps)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            grads[name] = [q.grad.clone() for q in model.parameters()]
            optimisers[name].step()
        identical &= all(torch.equal(a, b) for a, b in zip(grads["one"], grads["many"]))
    one_s, many_s = statistics.median(times["one"]), statistics.median(times["many"])
    print(json.dumps({"radii": p.radii, "unroll_steps": p.unroll_steps, "threads": 1 + len(replicas),
                      "step_s_one_thread": round(one_s, 4), "step_s_branch_threads": round(many_s, 4),
                      "speedup": round(one_s / many_s, 2), "gradients_bit_identical_every_step": identical,
                      "repeats": args.repeats}, indent=1))


if __name__ == "__main__":
    main()
