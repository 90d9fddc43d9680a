"""Lightning data module: named streams of examples, tokenised once, batched with response-only labels."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Sampler

from selfdestruct.data.formatting import PromptFormat, collate, encode_example
from selfdestruct.data.records import Example

log = logging.getLogger(__name__)


class EncodedDataset(Dataset):
    """Examples encoded with the project's template; ``use_refusal`` trains on each example's refusal."""

    def __init__(self, examples: list[Example], tokenizer, max_length: int, fmt: PromptFormat,
                 use_refusal: bool = False) -> None:
        self.features = [encode_example(tokenizer, ex, max_length, fmt, ex.refusal if use_refusal else None)
                         for ex in examples]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def item_length(feature) -> int:
    """Tokens of one dataset item; an item of a paired stream (a tuple of encoded rows) counts its longest row."""
    rows = feature if isinstance(feature, tuple) else (feature,)
    return max(len(row["input_ids"]) for row in rows)


class LengthGroupedSampler(Sampler[int]):
    """A random order in which each run of ``batch_size`` indices has examples of similar length.

    Every epoch: a random permutation, cut into mega-batches of ``MEGABATCH`` batches; each mega-batch is
    sorted by length and cut into batches; the batches are shuffled. Batches stay random draws of the data
    (as with ``shuffle=True``) while padding shrinks: the synthetic world's examples are 9-53 tokens long,
    so a random batch of 32 is padded to about twice its mean length. Deterministic given the generator.
    Off by default: a batch of similar lengths is there mostly a batch of one task family, and pre-training and
    alignment trained that way lost half their utility (conf/pretrain/default.yaml).
    """

    MEGABATCH = 50  # batches per sorted mega-batch (the choice of Hugging Face's group_by_length)

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator) -> None:
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.MEGABATCH * self.batch_size
        batches = []
        for start in range(0, len(order), span):
            mega = sorted(order[start:start + span], key=lambda i: self.lengths[i], reverse=True)
            batches += [mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield from batches[b]


class StreamsDataModule(pl.LightningDataModule):
    """One or several example streams; a training batch is a dict ``{stream_name: batch}``.

    With several streams (SEAM needs harmful, refusal and benign batches at once) the shortest ones
    cycle until the longest is exhausted, so one epoch sees every example of the largest stream.
    """

    def __init__(self, streams: dict[str, EncodedDataset], batch_size: int, pad_id: int, seed: int,
                 shuffle: bool = True, group_by_length: bool = False) -> None:
        super().__init__()
        if not streams:
            raise ValueError("StreamsDataModule needs at least one stream")
        self.streams = streams
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        for name, dataset in streams.items():
            log.info("stream %s: %d examples", name, len(dataset))

    def _collate_for(self, dataset: Dataset):
        return lambda feats: collate(feats, self.pad_id)

    def _loader(self, index: int, dataset: Dataset) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + index)
        # an item of a paired stream holds several rows: fewer items make a batch of ``batch_size`` rows
        batch_size = max(1, self.batch_size // getattr(dataset, "rows_per_item", 1))
        collate_fn = self._collate_for(dataset)
        if self.group_by_length and self.shuffle:
            sampler = LengthGroupedSampler([item_length(f) for f in dataset.features], batch_size, generator)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=0)
        return DataLoader(dataset, batch_size=batch_size, shuffle=self.shuffle, generator=generator,
                          collate_fn=collate_fn, num_workers=0)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {name: self._loader(i, ds) for i, (name, ds) in enumerate(self.streams.items())}
        return CombinedLoader(loaders, mode="max_size_cycle")
