"""The one prompt template of every stage, and the label mask that puts the loss on response tokens.

SPEC §2: defense and attack must see the same template, and the loss covers response tokens only
(prompt and padding positions get label -100). Plain text (an empty prompt) is trained on every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from selfdestruct.data.records import Example

if TYPE_CHECKING:  # torch is imported by the two batch functions below: the config checks read PromptFormat first
    import torch

IGNORE_INDEX = -100
DEFAULT_TEMPLATE = "Question: {prompt}\nAnswer:"


@dataclass(frozen=True)
class PromptFormat:
    """How an example becomes text: ``template`` wraps the prompt; the response follows after a space."""

    template: str = DEFAULT_TEMPLATE

    def prompt_text(self, prompt: str) -> str:
        return self.template.format(prompt=prompt) if prompt else ""

    def response_text(self, example: Example, response: str | None = None) -> str:
        text = example.response if response is None else response
        return f" {text}" if example.prompt else text


def encode_example(
    tokenizer, example: Example, max_length: int, fmt: PromptFormat = PromptFormat(), response: str | None = None
) -> dict[str, list[int]]:
    """Token ids and labels of one example; ``response`` overrides the example's (e.g. its refusal).

    Prompt and response are tokenised apart so the boundary between them is exact; the response ends
    with EOS so that a trained model stops. Too-long examples are cut from the right.
    """
    prompt_ids = tokenizer.encode(fmt.prompt_text(example.prompt), add_special_tokens=False) if example.prompt else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    response_ids = tokenizer.encode(fmt.response_text(example, response), add_special_tokens=False)
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (bos + prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch (padding: attention 0, label -100)."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_prompts(tokenizer, prompts: list[str], fmt: PromptFormat = PromptFormat()) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation (the answer is generated right after ``Answer:``)."""
    import torch

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer.encode(fmt.prompt_text(p), add_special_tokens=False) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}
