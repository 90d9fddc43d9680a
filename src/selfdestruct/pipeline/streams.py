"""The data streams of the defense stage (SPEC §2 roles), each drawn from the data bundle with its own seeded shuffle.

A defense's registry entry (:mod:`selfdestruct.defenses`) names one builder here; the builder reads the sizes
from the defense's parameter dataclass and returns the streams with the size each was configured to have, which
the stage checks before training (SPEC §2: a size setting that silently does nothing is the worst bug here).

Roles: ``harmful`` (D_adv: defense prompts with harmful responses), ``refusal`` (D_aln: the same prompts with
their refusals, paired row by row with ``harmful`` and padded to one width), ``benign`` (D_bgn: the benign tasks
of the alignment data), ``align`` (the alignment data: refusals and benign answers), ``general`` (D_gen: every
non-refusal of the alignment data), ``retain`` (the published CTRAP/Booster batch: refusals ⊕ helpful answers).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import Dataset

from selfdestruct.data.datamodule import EncodedDataset, ResumableDataLoader, StreamsDataModule
from selfdestruct.data.formatting import PromptFormat, collate, encode_example
from selfdestruct.data.records import Example
from selfdestruct.data.sources import DataBundle
from selfdestruct.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoding:
    """How the examples of every stream are encoded, and the seed of their shuffles."""

    tokenizer: Any
    max_length: int
    fmt: PromptFormat
    seed: int

    def encoded(self, examples: Sequence[Example]) -> EncodedDataset:
        return EncodedDataset(list(examples), self.tokenizer, self.max_length, self.fmt)


def is_refusal(example: Example) -> bool:
    """An alignment example that answers a harmful prompt with its refusal."""
    return example.refusal is not None and example.response == example.refusal


def benign_tasks(examples: Sequence[Example]) -> list[Example]:
    """Benign instruction/answer pairs (D_bgn): no refusal, a prompt, not plain general text."""
    return [ex for ex in examples if not is_refusal(ex) and ex.prompt and ex.category != "general"]


def benign_or_general(examples: Sequence[Example]) -> list[Example]:
    """Everything of the alignment data that is not a refusal (D_gen: benign tasks and plain text)."""
    return [ex for ex in examples if not is_refusal(ex)]


def sample(examples: Sequence[Example], n: int | None, seed: int, role: str) -> list[Example]:
    """``n`` examples (all when None) in a seeded order of their own; too few available is an error, never a cap."""
    available = len(examples)
    n = available if n is None else int(n)
    if n < 1 or n > available:
        raise UserError(f"defense stream {role!r}: {n} examples requested, {available} available")
    out = list(examples)
    random.Random(f"defense-{role}-{seed}").shuffle(out)
    return out[:n]


class PairedDataset(Dataset):
    """Each harmful prompt twice: with its harmful response and with its refusal, batched together."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int, fmt: PromptFormat) -> None:
        missing = sum(ex.refusal is None for ex in examples)
        if missing:
            raise UserError(f"SEAM needs a refusal for every harmful prompt: {missing} of {len(examples)} have none")
        self.features = [
            (encode_example(tokenizer, ex, max_length, fmt, ex.response),
             encode_example(tokenizer, ex, max_length, fmt, ex.refusal))
            for ex in examples
        ]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int):
        return self.features[index]


class RetainDataset(Dataset):
    """CTRAP's retain batch (SPEC §4): item i is a refusal and a helpful answer, batched into one batch of both."""

    rows_per_item = 2

    def __init__(self, refusals: Sequence[Example], helpful: Sequence[Example], tokenizer, max_length: int,
                 fmt: PromptFormat) -> None:
        if len(refusals) != len(helpful):
            raise ValueError(f"retain stream: {len(refusals)} refusals but {len(helpful)} helpful examples")
        self.features = [(encode_example(tokenizer, r, max_length, fmt), encode_example(tokenizer, h, max_length, fmt))
                         for r, h in zip(refusals, helpful)]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int):
        return self.features[index]


def collate_retain(pairs: list[tuple[dict, dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Refusals first, then the helpful answers: one batch of 2·len(pairs) rows."""
    return collate([r for r, _ in pairs] + [h for _, h in pairs], pad_id)


def collate_pairs(pairs: list[tuple[dict, dict]], pad_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """``{"harmful": batch, "refusal": batch}`` padded to one common width (rows aligned by prompt)."""
    n = len(pairs)
    both = collate([h for h, _ in pairs] + [r for _, r in pairs], pad_id)
    return {"harmful": {k: v[:n] for k, v in both.items()}, "refusal": {k: v[n:] for k, v in both.items()}}


class DefenseDataModule(StreamsDataModule):
    """:class:`StreamsDataModule` that also takes paired streams; their two halves are lifted to the top level.

    A batch ``{"pair": {"harmful": b1, "refusal": b2}, "benign": b3}`` reaches the module as
    ``{"harmful": b1, "refusal": b2, "benign": b3}``.
    """

    def _collate_for(self, dataset: Dataset):
        if isinstance(dataset, PairedDataset):
            return lambda feats: collate_pairs(feats, self.pad_id)
        if isinstance(dataset, RetainDataset):
            return lambda feats: collate_retain(feats, self.pad_id)
        return lambda feats: collate(feats, self.pad_id)

    def train_dataloader(self) -> CombinedLoader:
        loaders = {}
        for index, (name, dataset) in enumerate(self.streams.items()):
            generator = torch.Generator().manual_seed(self.seed + index)
            # a retain item holds two rows (a refusal and a helpful answer): half as many items make a batch
            batch_size = max(1, self.batch_size // getattr(dataset, "rows_per_item", 1))
            loaders[name] = ResumableDataLoader(dataset, batch_size=batch_size, shuffle=self.shuffle,
                                                generator=generator, collate_fn=self._collate_for(dataset),
                                                num_workers=0, stream=name, position=self.saved_position(name))
        return CombinedLoader(loaders, mode="max_size_cycle")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, dict):
            return batch
        flat: dict[str, Any] = {}
        for name, value in batch.items():
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                flat.update(value)
            else:
                flat[name] = value
        return flat


@dataclass
class DefenseData:
    """The streams of one defense, and how many examples each role was configured to hold."""

    streams: dict[str, Dataset]
    expected: dict[str, int]

    def sizes(self) -> dict[str, int]:
        """Realised examples per role (a paired stream counts for both of its roles)."""
        out: dict[str, int] = {}
        for name, ds in self.streams.items():
            if isinstance(ds, PairedDataset):
                out["harmful"] = out["refusal"] = len(ds)
            else:
                out[name] = len(ds)
        return out


def _configured(n: int | None, pool: Sequence[Example]) -> int:
    """The configured size of a stream: ``n``, or the whole pool when ``n`` is None."""
    return len(pool) if n is None else int(n)


def paired_streams(bundle: DataBundle, p, enc: Encoding) -> DefenseData:
    """``harmful`` and ``refusal`` as one paired stream of ``p.num_samples`` prompts (None: the whole pool)."""
    n_pairs = _configured(p.num_samples, bundle.defense_harmful)
    harmful = sample(bundle.defense_harmful, n_pairs, enc.seed, "harmful")
    return DefenseData(streams={"pair": PairedDataset(harmful, enc.tokenizer, enc.max_length, enc.fmt)},
                       expected={"harmful": n_pairs, "refusal": n_pairs})


def general_text(examples: Sequence[Example]) -> list[Example]:
    """The plain text of the alignment data (no prompt)."""
    return [ex for ex in examples if ex.category == "general"]


# SEAM's D_bgn by ``benign_data``: the benign tasks (paper), plain text, or both
SEAM_BENIGN: dict[str, Callable[[Sequence[Example]], list[Example]]] = {
    "tasks": benign_tasks, "general": general_text, "both": benign_or_general}


def seam_streams(bundle: DataBundle, p, enc: Encoding) -> DefenseData:
    """The paired stream and ``benign`` (``p.num_benign``; None: as many as pairs, as the official code), drawn
    from the alignment data's part that ``p.benign_data`` names."""
    data = paired_streams(bundle, p, enc)
    n_benign = data.expected["harmful"] if p.num_benign is None else p.num_benign
    pool = SEAM_BENIGN[p.benign_data](bundle.align)
    if not pool:
        raise UserError(f"defense.params.benign_data={p.benign_data!r}: the alignment data has no such examples "
                        f"(choose one of {', '.join(SEAM_BENIGN)})")
    data.streams["benign"] = enc.encoded(sample(pool, n_benign, enc.seed, "benign"))
    data.expected["benign"] = n_benign
    return data


def retain_streams(bundle: DataBundle, p, enc: Encoding) -> DefenseData:
    """``retain`` (``p.num_align`` refusal ⊕ helpful pairs; None: every refusal) and ``harmful`` (``p.num_samples``):
    the published CTRAP and Booster batches."""
    refusals = [ex for ex in bundle.align if is_refusal(ex)]
    n_pairs = _configured(p.num_align, refusals)
    n_harmful = _configured(p.num_samples, bundle.defense_harmful)
    retain = RetainDataset(sample(refusals, n_pairs, enc.seed, "refusal"),
                           sample(benign_tasks(bundle.align), n_pairs, enc.seed, "helpful"), enc.tokenizer,
                           enc.max_length, enc.fmt)
    harmful = enc.encoded(sample(bundle.defense_harmful, n_harmful, enc.seed, "harmful"))
    return DefenseData(streams={"retain": retain, "harmful": harmful},
                       expected={"retain": n_pairs, "harmful": n_harmful})


# each plain role: its pool in the data bundle and the parameter field that sets its size (None: the whole pool)
POOLS: dict[str, tuple[Callable[[DataBundle], Sequence[Example]], str]] = {
    "align": (lambda b: b.align, "num_align"),
    "harmful": (lambda b: b.defense_harmful, "num_samples"),
    "general": (lambda b: benign_or_general(b.align), "num_general"),
}


def role_streams(*roles: str) -> Callable[[DataBundle, Any, Encoding], DefenseData]:
    """A builder of one plain stream per role (see :data:`POOLS`), sized by the role's parameter field."""
    unknown = [r for r in roles if r not in POOLS]
    if unknown:
        raise ValueError(f"no pool for role {unknown[0]!r} (known: {', '.join(POOLS)})")

    def build(bundle: DataBundle, p, enc: Encoding) -> DefenseData:
        expected = {r: _configured(getattr(p, POOLS[r][1]), POOLS[r][0](bundle)) for r in roles}
        return DefenseData(streams={r: enc.encoded(sample(POOLS[r][0](bundle), expected[r], enc.seed, r))
                                    for r in roles}, expected=expected)

    return build


def ctrap_streams(bundle: DataBundle, p, enc: Encoding) -> DefenseData:
    """data=retain (published): ``retain`` and ``harmful`` (the collapse loss planted on the retain batch);
    data=align_general: ``align``, ``harmful`` and ``general`` (collapse on non-refusals only)."""
    if p.data == "retain":
        return retain_streams(bundle, p, enc)
    return role_streams("align", "harmful", "general")(bundle, p, enc)


def check_sizes(data: DefenseData, loggers: Sequence[Logger]) -> dict[str, int]:
    """Log the realised size of every stream and stop if any differs from the configured one."""
    sizes = data.sizes()
    log.info("defense streams: %s", ", ".join(f"{k}={v}" for k, v in sizes.items()))
    if sizes != data.expected:
        raise RuntimeError(f"defense streams have sizes {sizes}, the configuration asks for {data.expected}")
    for logger in loggers:
        logger.log_hyperparams({f"defense/size/{k}": v for k, v in sizes.items()})
    return sizes


