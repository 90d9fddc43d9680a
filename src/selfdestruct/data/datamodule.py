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


class ResumableDataLoader(DataLoader):
    """A data loader whose position is saved in checkpoints, so a resumed fit sees the batches an uninterrupted one
    would have seen, in the same order (Lightning saves ``state_dict()`` of every training loader with the
    checkpoint).

    A pass's shuffle is fixed by the state of the loader's generator when the pass starts (the iterator draws its
    base seed and then the permutation from it). The state is that snapshot and the number of batches handed out
    since; a restored loader re-creates the same pass and skips what was already trained on (or, when the
    checkpoint closed an epoch, replays that pass and starts the next), and every later pass then draws from the
    generator exactly as in the uninterrupted run. Batches are handed out without prefetching (in-process loading,
    and Lightning does not prefetch a loader whose length it knows), so "handed out" is "trained on" when a step's
    checkpoint is saved.

    Lightning builds the training loaders before it restores a checkpoint when the schedule asks for
    ``estimated_stepping_batches``, and then never hands the saved positions back; so the positions are given to
    the data module before the fit (:meth:`StreamsDataModule.resume_positions`), which builds its loaders with them
    (``position``).
    """

    def __init__(self, *args, stream: str = "train", position: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stream = stream
        self._pass_start: torch.Tensor | None = None
        self._handed_out = 0
        # a constructor argument, so it survives Lightning re-creating the loader (e.g. to add a distributed sampler)
        self._to_restore: dict | None = position

    def __iter__(self):
        restore, self._to_restore = self._to_restore, None
        if restore is not None:
            if self.generator is not None and restore["pass_start"] is not None:
                self.generator.set_state(restore["pass_start"])
            iterator = super().__iter__()  # the saved pass again: same base seed, same permutation
            for _ in range(restore["handed_out"]):
                next(iterator)
            if not restore.get("epoch_done"):
                self._pass_start, self._handed_out = restore["pass_start"], restore["handed_out"]
                return self._counted(iterator)
            # the checkpoint closed an epoch: the next epoch's pass starts here, as in the uninterrupted run
        self._pass_start = self.generator.get_state().clone() if self.generator is not None else None
        self._handed_out = 0
        return self._counted(super().__iter__())

    def _counted(self, iterator):
        for batch in iterator:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict:
        return {"stream": self.stream, "pass_start": self._pass_start, "handed_out": self._handed_out}

    def load_state_dict(self, state: dict) -> None:
        self._to_restore = dict(state)


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
        self._positions: dict[str, dict] = {}
        for name, dataset in streams.items():
            log.info("stream %s: %d examples", name, len(dataset))

    def _loader(self, index: int, dataset: EncodedDataset) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed + index)
        name = list(self.streams)[index]
        return ResumableDataLoader(dataset, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator,
                                   collate_fn=lambda feats: collate(feats, self.pad_id), num_workers=0,
                                   stream=name, position=self.saved_position(name))

    def resume_positions(self, states: list[dict]) -> None:
        """Saved :meth:`ResumableDataLoader.state_dict` of each stream, given to the next loaders built."""
        self._positions = {state["stream"]: state for state in states}

    def saved_position(self, stream: str) -> dict | None:
        return self._positions.pop(stream, None)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {name: self._loader(i, ds) for i, (name, ds) in enumerate(self.streams.items())}
        return CombinedLoader(loaders, mode="max_size_cycle")
