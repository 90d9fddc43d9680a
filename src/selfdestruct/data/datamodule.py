"""Lightning data module: named streams of examples, tokenised once, batched with response-only labels."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

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


class StreamsDataModule(pl.LightningDataModule):
    """One or several example streams; a training batch is a dict ``{stream_name: batch}``.

    With several streams (SEAM needs harmful, refusal and benign batches at once) the shortest ones
    cycle until the longest is exhausted, so one epoch sees every example of the largest stream.
    """

    def __init__(self, streams: dict[str, EncodedDataset], batch_size: int, pad_id: int, seed: int,
                 shuffle: bool = True) -> None:
        super().__init__()
        if not streams:
            raise ValueError("StreamsDataModule needs at least one stream")
        self.streams = streams
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        for name, dataset in streams.items():
            log.info("stream %s: %d examples", name, len(dataset))

    def _loader(self, index: int, dataset: EncodedDataset) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + index)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator,
                          collate_fn=lambda feats: collate(feats, self.pad_id), num_workers=0)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {name: self._loader(i, ds) for i, (name, ds) in enumerate(self.streams.items())}
        return CombinedLoader(loaders, mode="max_size_cycle")
