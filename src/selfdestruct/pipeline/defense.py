"""The defense stage (SPEC §1, stage 3): SEAM or CTRAP applied to the aligned model.

:func:`apply_defense` turns ``conf/defense/<name>.yaml`` (``params`` and ``optim``) into the data streams the method
needs, trains, and returns the defended model. Every stream is drawn from the data bundle with its own seeded
shuffle, and its realised size is logged and checked against the configuration before training starts (SPEC §2:
a size setting that silently does nothing is the worst bug here).

Streams (SPEC §2 roles):
- SEAM: ``harmful`` (D_adv: defense prompts with harmful responses) and ``refusal`` (D_aln: the same prompts with
  their refusals) come from one paired loader, so row i of both batches is the same prompt and both are padded to
  one width (what ``official_masking`` compares position by position); ``benign`` (D_bgn) are the benign task
  examples of the alignment data.
- CTRAP: ``align`` (the alignment data: refusals and benign answers), ``harmful`` (D_adv) and ``general`` (D_gen,
  where the collapse loss is planted: the alignment data's benign tasks and plain text).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import Dataset

from selfdestruct.data.datamodule import EncodedDataset, ResumableDataLoader, StreamsDataModule
from selfdestruct.data.formatting import PromptFormat, collate, encode_example
from selfdestruct.data.records import Example
from selfdestruct.data.sources import DataBundle
from selfdestruct.errors import FieldError, UserError, check_choice, check_number
from selfdestruct.modules.ctrap import CTRAPModule
from selfdestruct.modules.seam import DefenseModule, SEAMModule
from selfdestruct.objectives.common import eager_attention
from selfdestruct.modules.attack import merged, wrap_lora
from selfdestruct.objectives.ctrap import COLLAPSE_RULES, GRADIENTS, LOOKAHEADS, collapse_token_id
from selfdestruct.objectives.seam import ESTIMATORS
from selfdestruct.pipeline.training import OptimConfig, TrainerConfig, fit

log = logging.getLogger(__name__)
DEFENSES = ("sft", "seam", "ctrap")
CTRAP_DATA = ("retain", "align_general")
ADAPTERS = ("lora", "full")


# --------------------------------------------------------------------------------------------------------------
# Hyper-parameters (``defense.params``); the meaning and source of each default is in conf/defense/*.yaml
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeamParams:
    """SEAM's hyper-parameters and data sizes (``conf/defense/seam.yaml`` ``params``)."""

    alpha: float = 1.0
    beta: float = 0.01
    eps: float = 1e-3
    estimator: str = "forward"
    official_masking: bool = False
    benign_weight: float = 0.0
    num_samples: int | None = None  # harmful/refusal pairs; None = the whole defense pool
    num_benign: int | None = None  # benign examples; None = as many as num_samples (the official code)

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "benign_weight"):
            check_number(self, name)
        check_number(self, "eps", low=0.0, low_open=True)
        check_choice(self, "estimator", ESTIMATORS)
        check_number(self, "num_samples", low=1, integer=True, optional=True)
        check_number(self, "num_benign", low=1, integer=True, optional=True)


@dataclass(frozen=True)
class CtrapParams:
    """CTRAP's hyper-parameters and data sizes (``conf/defense/ctrap.yaml`` ``params``)."""

    lam: float = 0.1
    step_size: float = 0.1
    normalize_step: bool = True
    gradient: str = "first_order"
    lookahead: str = "sgd"
    radii: list[float] | None = None
    unroll_steps: int = 1
    adam_beta2: float = 0.999
    collapse_word: str = "error"
    collapse_token: str = "published"  # published: last token of "an error" | first: first token of " error"
    measure_lookahead: bool = True
    data: str = "retain"  # retain (published) | align_general (beyond the paper)
    adapter: str = "lora"  # lora (published: the adapters are trained, then merged) | full (all parameters)
    lora_rank: int = 32
    lora_alpha: int = 4
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    num_samples: int | None = None  # harmful examples; None = the whole defense pool
    num_align: int | None = None  # retain: refusal/helpful pairs; align_general: alignment examples; None = all
    num_general: int | None = None  # align_general only: examples for the collapse loss; None = all

    def __post_init__(self) -> None:
        choices = {"gradient": GRADIENTS, "lookahead": LOOKAHEADS, "data": CTRAP_DATA, "adapter": ADAPTERS,
                   "collapse_token": COLLAPSE_RULES}
        for key, allowed in choices.items():
            check_choice(self, key, allowed)
        check_number(self, "lam")
        check_number(self, "step_size", low=0.0, low_open=True)
        check_number(self, "unroll_steps", low=1, integer=True)
        check_number(self, "adam_beta2", low=0.0, high=1.0, low_open=True)
        check_number(self, "lora_rank", low=1, integer=True)
        check_number(self, "lora_alpha", low=0.0, low_open=True)
        check_number(self, "lora_dropout", low=0.0, high=0.99)
        for name in ("num_samples", "num_align", "num_general"):
            check_number(self, name, low=1, integer=True, optional=True)
        if self.radii is not None and (not self.radii or not all(isinstance(r, (int, float)) and r > 0
                                                                 for r in self.radii)):
            raise FieldError("radii", self.radii, "expected null or a non-empty list of positive step sizes")
        if self.data == "retain" and self.num_general is not None:
            raise FieldError("num_general", self.num_general, "with data=retain the collapse loss is planted on the "
                             "retain batch itself (set num_align, or data=align_general)")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))


PARAMS = {"sft": None, "seam": SeamParams, "ctrap": CtrapParams}


def parse_params(name: str, params: Mapping[str, Any] | None):
    """``defense.params`` as the method's dataclass; an unknown key is an error naming it (nothing is ignored)."""
    if name not in PARAMS:
        raise UserError(f"defense={name!r}: expected one of {DEFENSES}")
    values = _plain(params or {})
    cls = PARAMS[name]
    if cls is None:
        if values:
            raise UserError(f"defense.params.{sorted(values)[0]}: defense={name} takes no parameters")
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"defense.params.{unknown[0]}: unknown option for {name} (known: {', '.join(sorted(known))})")
    try:
        return cls(**values)
    except FieldError as err:
        raise err.under("defense.params") from None


def _plain(params: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(params, DictConfig):
            return OmegaConf.to_container(params, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        pass
    return dict(params)


# --------------------------------------------------------------------------------------------------------------
# Data: sampled subsets, the paired harmful/refusal stream, the data module
# --------------------------------------------------------------------------------------------------------------


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


def seam_streams(bundle: DataBundle, p: SeamParams, tokenizer, max_length: int, fmt: PromptFormat,
                 seed: int) -> DefenseData:
    n_pairs = _configured(p.num_samples, bundle.defense_harmful)
    n_benign = n_pairs if p.num_benign is None else p.num_benign
    harmful = sample(bundle.defense_harmful, n_pairs, seed, "harmful")
    benign = sample(benign_tasks(bundle.align), n_benign, seed, "benign")
    return DefenseData(
        streams={"pair": PairedDataset(harmful, tokenizer, max_length, fmt),
                 "benign": EncodedDataset(benign, tokenizer, max_length, fmt)},
        expected={"harmful": n_pairs, "refusal": n_pairs, "benign": n_benign},
    )


def ctrap_streams(bundle: DataBundle, p: CtrapParams, tokenizer, max_length: int, fmt: PromptFormat,
                  seed: int) -> DefenseData:
    """data=retain (published): ``harmful`` and ``retain`` (refusal ⊕ helpful pairs, where the collapse loss is
    planted too); data=align_general: ``align``, ``harmful`` and ``general`` (collapse on non-refusals only)."""
    if p.data == "retain":
        refusals = [ex for ex in bundle.align if is_refusal(ex)]
        n_pairs = _configured(p.num_align, refusals)
        n_harmful = _configured(p.num_samples, bundle.defense_harmful)
        retain = RetainDataset(sample(refusals, n_pairs, seed, "refusal"),
                               sample(benign_tasks(bundle.align), n_pairs, seed, "helpful"), tokenizer, max_length, fmt)
        harmful = EncodedDataset(sample(bundle.defense_harmful, n_harmful, seed, "harmful"), tokenizer, max_length,
                                 fmt)
        return DefenseData(streams={"retain": retain, "harmful": harmful},
                           expected={"retain": n_pairs, "harmful": n_harmful})
    pools = {"align": bundle.align, "harmful": bundle.defense_harmful, "general": benign_or_general(bundle.align)}
    wanted = {"align": p.num_align, "harmful": p.num_samples, "general": p.num_general}
    expected = {role: _configured(wanted[role], pool) for role, pool in pools.items()}
    return DefenseData(
        streams={role: EncodedDataset(sample(pool, expected[role], seed, role), tokenizer, max_length, fmt)
                 for role, pool in pools.items()},
        expected=expected,
    )


def check_sizes(data: DefenseData, loggers: Sequence[Logger]) -> dict[str, int]:
    """Log the realised size of every stream and stop if any differs from the configured one."""
    sizes = data.sizes()
    log.info("defense streams: %s", ", ".join(f"{k}={v}" for k, v in sizes.items()))
    if sizes != data.expected:
        raise RuntimeError(f"defense streams have sizes {sizes}, the configuration asks for {data.expected}")
    for logger in loggers:
        logger.log_hyperparams({f"defense/size/{k}": v for k, v in sizes.items()})
    return sizes


# --------------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------------


def _optim_kwargs(optim: OptimConfig) -> dict[str, Any]:
    return {"weight_decay": optim.weight_decay, "warmup_ratio": optim.warmup_ratio, "schedule": optim.schedule,
            "max_grad_norm": optim.max_grad_norm}


def build_defense(model: torch.nn.Module, tokenizer, bundle: DataBundle, name: str, params: Mapping[str, Any],
                  optim: OptimConfig, fmt: PromptFormat, seed: int) -> tuple[DefenseModule, DefenseData, bool]:
    """The module and the streams of defense ``name``, and whether it runs in an exact (double-backward) mode."""
    p = parse_params(name, params)
    if p is None:
        raise ValueError(f"defense={name} trains nothing: there is no module to build")
    if isinstance(p, SeamParams):
        data = seam_streams(bundle, p, tokenizer, optim.max_length, fmt, seed)
        module = SEAMModule(model, optim.lr, alpha=p.alpha, beta=p.beta, eps=p.eps, estimator=p.estimator,
                            official_masking=p.official_masking, benign_weight=p.benign_weight,
                            **_optim_kwargs(optim))
        return module, data, p.estimator == "exact"
    token_id = collapse_token_id(tokenizer, p.collapse_word, rule=p.collapse_token)
    log.info("CTRAP collapse token: id %d = %r", token_id, tokenizer.decode([token_id]))
    data = ctrap_streams(bundle, p, tokenizer, optim.max_length, fmt, seed)
    if p.adapter == "lora":
        model = wrap_lora(model, p.lora_rank, p.lora_alpha, p.lora_dropout, list(p.lora_targets))
    module = CTRAPModule(model, optim.lr, token_id=token_id, lam=p.lam, step_size=p.step_size,
                         normalize_step=p.normalize_step, gradient_mode=p.gradient, lookahead=p.lookahead,
                         radii=p.radii, unroll_steps=p.unroll_steps, adam_beta2=p.adam_beta2,
                         measure_lookahead=p.measure_lookahead, **_optim_kwargs(optim))
    return module, data, p.gradient == "exact"


def apply_defense(model: torch.nn.Module, tokenizer, bundle: DataBundle, name: str, params: Mapping[str, Any] | None,
                  optim: OptimConfig | None, trainer_cfg: TrainerConfig, loggers: list[Logger], run_dir: Path,
                  seed: int, fmt: PromptFormat, ckpt_dir: Path | None = None, ckpt_key: Any = None) -> torch.nn.Module:
    """Defend ``model`` with ``name`` (sft: returned as is); returns the defended plain HF model.

    The defense logs every step (``log_every_n_steps=1``); exact modes run the whole fit with eager attention.
    A non-finite gradient raises :class:`~selfdestruct.objectives.common.NonFiniteGradientError` out of this
    function, so the caller never saves a broken model. With ``ckpt_dir`` the fit checkpoints there and resumes
    (see :func:`~selfdestruct.pipeline.training.fit`).
    """
    if parse_params(name, params) is None:  # sft: the aligned model is the released model
        return model
    if optim is None:
        raise UserError(f"defense={name} needs defense.optim (learning rate, epochs, batch size)")
    pl.seed_everything(seed, workers=True, verbose=False)
    module, data, exact = build_defense(model, tokenizer, bundle, name, params or {}, optim, fmt, seed)
    check_sizes(data, loggers)
    datamodule = DefenseDataModule(data.streams, batch_size=optim.batch_size, pad_id=tokenizer.pad_token_id,
                                   seed=seed)
    stage_cfg = dataclasses.replace(trainer_cfg, log_every_n_steps=1)
    with eager_attention(module.model) if exact else nullcontext():
        trainer = fit(module, datamodule, stage_cfg, optim.epochs, loggers, run_dir, ckpt_dir=ckpt_dir,
                      ckpt_key=ckpt_key)
    last = module.history[-1] if module.history else {}
    log.info("%s: %d optimiser steps; last step %s", name, trainer.global_step,
             ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
    return merged(module.model)
