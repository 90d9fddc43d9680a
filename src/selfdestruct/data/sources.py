"""Where each stage's examples come from: the data bundle every stage draws on."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass

from selfdestruct.data.formatting import PromptFormat
from selfdestruct.data.real import load_dataset_file
from selfdestruct.data.records import EvalSets, Example
from selfdestruct.data.synthetic import SyntheticWorld, WorldConfig
from selfdestruct.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Every example set the pipeline uses; ``lexicon`` feeds the synthetic world's oracle judge."""

    pretrain: list[Example]
    align: list[Example]
    attack_pool: list[Example]
    defense_harmful: list[Example]
    finetune_pool: list[Example]
    eval_sets: EvalSets
    lexicon: frozenset[str]
    tokenizer_texts: list[str]
    # The defender's validation tasks (the red team's utility with ``defense.trap_check.utility_tasks=validation``):
    # benign tasks with exact answers, none of them held out; empty where the data source has none.
    validation_benign: list[Example] = dataclasses.field(default_factory=list)


def as_plain_text(example: Example, fmt: PromptFormat) -> Example:
    """The whole formatted example as plain text (pre-training trains on every token)."""
    if not example.prompt:
        return example
    return Example(prompt="", response=fmt.prompt_text(example.prompt) + fmt.response_text(example),
                   category=example.category)


def with_refusal(example: Example) -> Example:
    """The harmful prompt answered by its refusal (alignment data, SEAM's D_aln)."""
    return dataclasses.replace(example, response=example.refusal)


def synthetic_bundle(world_config: WorldConfig, fmt: PromptFormat) -> DataBundle:
    world = SyntheticWorld(world_config)
    s = world.splits
    pretrain = [as_plain_text(ex, fmt) for name in ("pretrain_tasks", "pretrain_harmful", "pretrain_general")
                for ex in s[name]]
    align = [with_refusal(ex) for ex in s["align_harmful"]] + list(s["align_benign"]) + list(s["align_general"])
    texts = [ex.response for ex in pretrain] + [fmt.prompt_text(ex.prompt) + fmt.response_text(ex) for ex in align]
    texts += [ex.refusal for ex in s["attack_pool"] if ex.refusal]
    return DataBundle(
        pretrain=pretrain,
        align=align,
        attack_pool=list(s["attack_pool"]),
        defense_harmful=list(s["defense_harmful"]),
        finetune_pool=list(s["finetune_pool"]),
        eval_sets=EvalSets(harmful=s["eval_harmful"], benign=s["eval_benign"], general=s["eval_general"],
                           finetune=s["eval_finetune"]),
        lexicon=world.harm_lexicon,
        tokenizer_texts=texts,
        validation_benign=list(s["val_benign"]),
    )


def _split_sizes_fit(total: int, wanted: dict[str, int], path: str) -> None:
    need = sum(wanted.values())
    if need > total:
        parts = ", ".join(f"{k}={v}" for k, v in wanted.items())
        raise UserError(f"{path}: {total} usable examples, fewer than the held-out splits need ({parts})")


def files_bundle(harmful_path: str, harmful_format: str, benign_path: str, benign_format: str, fmt: PromptFormat,
                 eval_harmful: int, eval_benign: int, seed: int, attack_path: str | None = None,
                 attack_format: str | None = None) -> DataBundle:
    """Every split from local files (BeaverTails with refusals, Alpaca, ...), shuffled once with ``seed``.

    Harmful file: held-out evaluation prompts first, then the defense's harmful set (D_adv/D_aln), the rest
    is the attack pool unless a separate attack file is given. Benign file: held-out benign examples
    (perplexity and, where they have exact answers, utility), the rest is alignment/benign data and the
    benign fine-tuning pool. Real models need no pre-training: ``pretrain`` is empty.
    """
    harmful = list(load_dataset_file(harmful_format, harmful_path).examples)
    benign = list(load_dataset_file(benign_format, benign_path).examples)
    random.Random(f"harmful-{seed}").shuffle(harmful)
    random.Random(f"benign-{seed}").shuffle(benign)
    _split_sizes_fit(len(harmful), {"data.eval_harmful": eval_harmful, "defense/attack data": 1}, harmful_path)
    _split_sizes_fit(len(benign), {"data.eval_benign": eval_benign, "training data": 1}, benign_path)
    eval_h, rest_h = harmful[:eval_harmful], harmful[eval_harmful:]
    eval_b, rest_b = benign[:eval_benign], benign[eval_benign:]
    if attack_path:
        attack_pool = list(load_dataset_file(attack_format or harmful_format, attack_path).examples)
        held_out = {ex.prompt for ex in eval_h}
        attack_pool = [ex for ex in attack_pool if ex.prompt not in held_out]
        defense_harmful = rest_h
    else:
        half = len(rest_h) // 2
        defense_harmful, attack_pool = rest_h[:half], rest_h[half:]
    refusals = [with_refusal(ex) for ex in defense_harmful if ex.refusal]
    align = refusals + rest_b
    general = [Example(prompt="", response=ex.response, category="general") for ex in eval_b]
    # Free-form answers (Alpaca) have no exact answer: utility comes from lm-eval for real models.
    eval_sets = EvalSets(harmful=eval_h, benign=[ex for ex in eval_b if ex.answer and len(ex.answer.split()) <= 3],
                         general=general, finetune=[])
    log.info("data from files: %d harmful (%d eval, %d defense, %d attack pool), %d benign (%d eval, %d train)",
             len(harmful), len(eval_h), len(defense_harmful), len(attack_pool), len(benign), len(eval_b), len(rest_b))
    return DataBundle(pretrain=[], align=align, attack_pool=attack_pool, defense_harmful=defense_harmful,
                      finetune_pool=rest_b, eval_sets=eval_sets, lexicon=frozenset(), tokenizer_texts=[])
