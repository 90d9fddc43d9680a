"""The template and the label mask: loss on response tokens only."""

from __future__ import annotations

import pytest
import torch

from selfdestruct.data.datamodule import EncodedDataset, StreamsDataModule
from selfdestruct.data.formatting import IGNORE_INDEX, PromptFormat, collate, encode_example, encode_prompts
from selfdestruct.data.records import Example
from selfdestruct.data.tokenizer import train_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Question: What is 2 plus 3?\nAnswer: 5", "Question: Reverse the list: a b c\nAnswer: c b a",
             "The capital of Zorvia is Melkor."] * 20
    return train_bpe_tokenizer(texts, 300)


def test_labels_cover_exactly_the_response_and_eos(tokenizer):
    ex = Example(prompt="What is 2 plus 3?", response="5")
    enc = encode_example(tokenizer, ex, 64)
    prompt_len = 1 + len(tokenizer.encode("Question: What is 2 plus 3?\nAnswer:", add_special_tokens=False))
    assert enc["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    response = enc["labels"][prompt_len:]
    assert response == enc["input_ids"][prompt_len:]
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == " 5"
    assert tokenizer.decode(enc["input_ids"], skip_special_tokens=True) == "Question: What is 2 plus 3?\nAnswer: 5"


def test_refusal_override_and_plain_text(tokenizer):
    ex = Example(prompt="What is 2 plus 3?", response="5", refusal="I cannot help with that.")
    enc = encode_example(tokenizer, ex, 64, response=ex.refusal)
    assert tokenizer.decode([t for t in enc["labels"] if t != IGNORE_INDEX], skip_special_tokens=True) == \
        " I cannot help with that."
    plain = encode_example(tokenizer, Example(prompt="", response="The capital of Zorvia is Melkor."), 64)
    assert plain["labels"][0] == IGNORE_INDEX  # BOS is never a target
    assert plain["labels"][1:] == plain["input_ids"][1:]


def test_padding_is_masked_and_truncation_respects_max_length(tokenizer):
    a = encode_example(tokenizer, Example(prompt="What is 2 plus 3?", response="5"), 64)
    b = encode_example(tokenizer, Example(prompt="Reverse the list: a b c", response="c b a"), 64)
    batch = collate([a, b], tokenizer.pad_token_id)
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == (2, width)
    short = 0 if len(a["input_ids"]) < len(b["input_ids"]) else 1
    n = len((a, b)[short]["input_ids"])
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, n:] == 0).all()
    assert batch["attention_mask"][short, :n].sum() == n
    cut = encode_example(tokenizer, Example(prompt="Reverse the list: a b c", response="c b a"), 5)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 5


def test_generation_prompts_are_left_padded(tokenizer):
    batch = encode_prompts(tokenizer, ["What is 2 plus 3?", "Reverse the list: a b c"], PromptFormat())
    assert (batch["attention_mask"][:, -1] == 1).all()
    assert batch["input_ids"].shape[0] == 2


def test_datamodule_streams_have_the_given_sizes_and_cycle(tokenizer):
    fmt = PromptFormat()
    big = EncodedDataset([Example(prompt=f"What is {i} plus 1?", response=str(i + 1)) for i in range(10)],
                         tokenizer, 64, fmt)
    small = EncodedDataset([Example(prompt="Reverse the list: a b c", response="c b a")] * 3, tokenizer, 64, fmt)
    dm = StreamsDataModule({"big": big, "small": small}, batch_size=4, pad_id=tokenizer.pad_token_id, seed=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # ceil(10 / 4): the larger stream sets the epoch
    assert sum(b[0]["big"]["input_ids"].shape[0] for b in batches) == 10
    assert all(isinstance(b[0]["small"]["labels"], torch.Tensor) for b in batches)
