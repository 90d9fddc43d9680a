"""The settings of the training stages as typed, validated dataclasses: optimiser, trainer, attack.

No torch here: the commands build and check these from the config before importing torch, Lightning or
transformers, so a bad value is refused in about a second (``selfdestruct.cli_config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from selfdestruct.errors import FieldError, check_choice, check_number

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adam", "sgd")  # sgd: with momentum (heavy ball); adam: L2 weight decay; adamw: decoupled


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings of one training stage (``conf/pretrain``, ``conf/align``, ``conf/attack``...)."""

    lr: float
    epochs: int = 1
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "constant"
    max_grad_norm: float | None = None
    max_length: int = 96
    # The weights a stage releases: null = the last iterate; a decay d in (0, 1) = the exponential moving average
    # of the iterates, w̄ ← d·w̄ + (1 − d)·w after every optimiser step (w̄ = w after the first), over about the last
    # 1/(1 − d) steps (of the trainable parameters; the rest do not move).
    ema_decay: float | None = None
    # true: when one of the stage's last 3 step losses is a spike (utils/spikes.py: more than 10 median absolute
    # deviations above the 100 steps before them), release the weights of the latest of the last 4 steps whose loss
    # was not one, instead of the last iterate (4 parameter-sized copies kept). false: the last iterate; a spike is
    # only warned about.
    spike_rollback: bool = False

    def __post_init__(self) -> None:
        check_optim_fields(self)

    def cache_key(self) -> dict[str, Any]:
        """The fields that identify what a stage builds: all of them, less ``ema_decay`` and ``spike_rollback``
        while they are off, so that the entries cached before those fields existed keep their keys."""
        fields = dataclasses.asdict(self)
        for name, off in (("ema_decay", None), ("spike_rollback", False)):
            if fields[name] == off:
                del fields[name]
        return fields


def check_optim_fields(cfg) -> None:
    """The optimiser fields every training stage shares, checked before any work (FieldError names the field)."""
    check_number(cfg, "lr", low=0.0, low_open=True)
    check_number(cfg, "epochs", low=1, integer=True)
    check_number(cfg, "batch_size", low=1, integer=True)
    check_number(cfg, "weight_decay", low=0.0)
    check_number(cfg, "warmup_ratio", low=0.0, high=1.0)
    check_choice(cfg, "schedule", SCHEDULES)
    check_number(cfg, "max_grad_norm", low=0.0, low_open=True, optional=True)
    check_number(cfg, "max_length", low=2, integer=True)
    check_number(cfg, "ema_decay", low=0.0, high=1.0, low_open=True, high_open=True, optional=True)
    if not isinstance(cfg.spike_rollback, bool):
        raise FieldError("spike_rollback", cfg.spike_rollback, "expected true or false")
    if cfg.spike_rollback and cfg.ema_decay is not None:
        raise FieldError("spike_rollback", cfg.spike_rollback, "choose one way to release the weights: "
                         "spike_rollback (an iterate from before a late spike) or ema_decay (the average), not both")


@dataclass(frozen=True)
class TrainerConfig:
    """Options passed to ``pl.Trainer`` (``conf/trainer``); the stage decides epochs and loggers."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 5
    progress_bar: bool = True
    deterministic: bool = False
    fast_dev_run: bool = False
    max_steps: int = -1
    checkpoint_every_n_steps: int = 100
    # Threads for the independent branches of one defense step (CTRAP's radii, one model copy per extra thread);
    # the step is bit-for-bit the one-thread step. 1 = one after another. Other stages and defenses: no branches.
    branch_threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_number(self, "log_every_n_steps", low=1, integer=True)
        check_number(self, "branch_threads", low=1, integer=True)
        check_number(self, "max_steps", low=-1, integer=True)
        check_number(self, "checkpoint_every_n_steps", low=0, integer=True)


@dataclass(frozen=True)
class AttackConfig(OptimConfig):
    """One attack (``conf/attack`` + ``conf/intensity``): what data, how much, how hard.

    The optimiser settings (lr, epochs, batch_size, weight_decay, warmup_ratio, schedule, max_grad_norm,
    max_length) are :class:`OptimConfig`'s; the fields below are the attacker's own.
    """

    name: str = "harmful"  # harmful (full parameters) | lora | mixed | benign
    data: str = "harmful"  # harmful | benign | mixed (benign data with a poison_ratio share of harmful pairs)
    # data=mixed only (required there; attack=mixed sets 0.1): the share of num_samples drawn from the harmful pool.
    # Refused with any other data, which would not read it.
    poison_ratio: float | None = None
    num_samples: int = 200
    lora: dict | None = None
    optimizer: str = "adamw"  # adamw | adam | sgd
    # optimizer=sgd only: its momentum (null: SGD_MOMENTUM). Refused with adamw and adam (torch's default betas).
    momentum: float | None = None
    # The attack's own seed (the order of its batches, the poison shuffle of data=mixed); null = the run's seed.
    # Set it to attack one defended model (built with the run's seed) under several data orders.
    seed: int | None = None

    @property
    def sgd_momentum(self) -> float:
        """The momentum optimizer=sgd steps with (attack.momentum, else SGD_MOMENTUM)."""
        return SGD_MOMENTUM if self.momentum is None else self.momentum

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "data", ATTACK_DATA)
        check_choice(self, "optimizer", OPTIMIZERS)
        check_number(self, "momentum", low=0.0, high=0.999, optional=True)
        if self.momentum is not None and self.optimizer != "sgd":
            raise FieldError("momentum", self.momentum, f"only optimizer=sgd reads it ({self.optimizer} runs with "
                             "torch's default betas): remove it, or set attack.optimizer=sgd")
        check_number(self, "num_samples", low=1, integer=True)
        if self.poison_ratio is None and self.data == "mixed":
            raise FieldError("poison_ratio", None, "a mixed attack needs the share of harmful pairs among "
                             "num_samples: a number in [0, 1] (attack=mixed sets 0.1)")
        check_number(self, "poison_ratio", low=0.0, high=1.0, optional=True)
        if self.poison_ratio is not None and self.data != "mixed":
            raise FieldError("poison_ratio", self.poison_ratio, f"only a mixed attack reads it (attack=mixed); "
                             f"with data={self.data} it would do nothing: remove it, or choose attack=mixed")
        check_number(self, "seed", low=0, integer=True, optional=True)
        if self.lora is not None:
            lora = dict(self.lora)
            unknown = sorted(set(lora) - set(LORA_KEYS))
            if unknown:
                raise FieldError(f"lora.{unknown[0]}", lora[unknown[0]], f"unknown option (known: {', '.join(LORA_KEYS)})")
            for key in ("rank", "alpha"):
                if not isinstance(lora.get(key), int) or isinstance(lora.get(key), bool) or lora[key] < 1:
                    raise FieldError(f"lora.{key}", lora.get(key), "expected an integer >= 1")
            dropout = lora.get("dropout", 0.0)
            if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
                raise FieldError("lora.dropout", dropout, "expected a number >= 0 and < 1")
            if not lora.get("target_modules"):
                raise FieldError("lora.target_modules", lora.get("target_modules"), "expected a list of module names")


ATTACK_DATA = ("harmful", "benign", "mixed")
SGD_MOMENTUM = 0.9  # attack.optimizer=sgd's momentum when attack.momentum is null (the usual heavy-ball value)
LORA_KEYS = ("rank", "alpha", "dropout", "target_modules")
