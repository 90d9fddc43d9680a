"""The stages of SPEC §1 as functions: base pre-training, safety alignment, attack, evaluation."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, Logger

from selfdestruct.data.datamodule import EncodedDataset, StreamsDataModule
from selfdestruct.data.formatting import PromptFormat
from selfdestruct.data.records import Example
from selfdestruct.data.tokenizer import train_bpe_tokenizer
from selfdestruct.models.io import load_model_dir, read_provenance, save_model_dir
from selfdestruct.models.tiny import TinyLlamaConfig, build_tiny_llama, count_parameters
from selfdestruct.modules.attack import AttackModule
from selfdestruct.modules.sft import SFTModule
from selfdestruct.pipeline.config import AttackConfig, OptimConfig, TrainerConfig
from selfdestruct.pipeline.training import StageContext, fit
from selfdestruct.errors import UserError
from selfdestruct.utils.cache import cached_dir, work_dir
from selfdestruct.utils.provenance import stage_record

log = logging.getLogger(__name__)
# Bump when a change to the code changes what a cached stage would produce.
CACHE_VERSION = 2  # 2: the world repeats training examples, user fine-tuning sets mix in instructions


def checkpoint_id(model_dir: Path) -> str:
    """A model directory's identity for cache keys: its path and when its weights last changed."""
    path = Path(model_dir)
    stamps = sorted(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in path.glob("*.safetensors")) \
        if path.is_dir() else []
    return f"{path}|{'|'.join(stamps)}"


def _shuffled(examples: list[Example], seed: int) -> list[Example]:
    out = list(examples)
    random.Random(seed).shuffle(out)
    return out


def _single_stream(examples, tokenizer, optim: OptimConfig, fmt: PromptFormat, seed: int,
                   use_refusal: bool = False) -> StreamsDataModule:
    dataset = EncodedDataset(examples, tokenizer, optim.max_length, fmt, use_refusal=use_refusal)
    return StreamsDataModule({"train": dataset}, batch_size=optim.batch_size, pad_id=tokenizer.pad_token_id,
                             seed=seed)


def _sft_module(model, optim: OptimConfig, prefix: str) -> SFTModule:
    return SFTModule(model, optim, log_prefix=prefix)


def made_in(parent: Path | None, stage: str | None) -> list[dict[str, Any]]:
    """A model's lineage: the stages that made ``parent`` (its provenance), then ``stage`` as run in this process
    (None: the weights are the parent's)."""
    lineage = list(read_provenance(parent).get("made_in", [])) if parent is not None else []
    return lineage + ([stage_record(stage)] if stage else [])


def _sft_and_save(ctx: StageContext, model, tokenizer, examples: list[Example], stage: str, optim: OptimConfig,
                  out: Path, key: dict, ckpt_dir: Path, parent: Path | None = None) -> None:
    """One cached SFT stage: train on shuffled ``examples``, log beside the entry, save the model into it;
    checkpoints in ``ckpt_dir`` (the entry's work directory) let a killed build resume; ``parent``: the model it
    started from (its lineage is carried on)."""
    module = _sft_module(model, optim, stage)
    datamodule = _single_stream(_shuffled(examples, ctx.seed), tokenizer, optim, ctx.fmt, ctx.seed)
    csv = CSVLogger(save_dir=str(out), name="csv", version="")
    fit(module, datamodule, ctx.trainer, optim.epochs, [csv, *ctx.loggers], out, ckpt_dir=ckpt_dir, ckpt_key=key)
    saved = stage if stage != "pretrain" else "base"
    save_model_dir(module.model, tokenizer, out / "model", {"stage": saved, "key": key,
                                                            "made_in": made_in(parent, saved)})


def length_key(trainer: TrainerConfig) -> dict[str, Any]:
    """How the trainer caps a stage's length, for its cache key: ``fast_dev_run`` always, ``max_steps`` when it caps,
    so that a capped run never fills the entry a full run reads (the keys of uncapped runs are as they were)."""
    key: dict[str, Any] = {"fast_dev_run": trainer.fast_dev_run}
    if trainer.max_steps != -1:
        key["max_steps"] = trainer.max_steps
    return key


def base_model_dir(ctx: StageContext, arch: TinyLlamaConfig, optim: OptimConfig) -> Path:
    """The pre-trained base model (tokenizer included), built once per configuration and cached."""
    if not ctx.bundle.pretrain:
        raise UserError("a model built from config (model=tiny|micro) is pre-trained on the synthetic world; this "
                        "data source has no pre-training text: use model=hf model.path=DIR for real data")
    key = {"stage": "base", "version": CACHE_VERSION, "data": ctx.data_key, "arch": dataclasses.asdict(arch),
           "optim": optim.cache_key(), "seed": ctx.seed, "template": ctx.fmt.template,
           **length_key(ctx.trainer)}

    def build(out: Path) -> None:
        pl.seed_everything(ctx.seed, workers=True, verbose=False)
        tokenizer = train_bpe_tokenizer(ctx.bundle.tokenizer_texts, arch.vocab_size)
        model = build_tiny_llama(arch, tokenizer, ctx.seed)
        log.info("pre-training a %s-parameter Llama on %d texts", f"{count_parameters(model):,}",
                 len(ctx.bundle.pretrain))
        _sft_and_save(ctx, model, tokenizer, ctx.bundle.pretrain, "pretrain", optim, out, key,
                      work_dir(ctx.cache_root, "base", key) / "checkpoints")

    return cached_dir(ctx.cache_root, "base", key, build) / "model"


def aligned_model_dir(ctx: StageContext, base_dir: Path, optim: OptimConfig, seed: int | None = None) -> Path:
    """Safety alignment (SFT on refusals plus benign answers) of ``base_dir``, cached by its configuration.
    ``seed``: the alignment's own seed (its data order, ``align.seed``); None: the run's seed."""
    key = {"stage": "align", "version": CACHE_VERSION, "base": checkpoint_id(base_dir), "data": ctx.data_key,
           "optim": optim.cache_key(), "seed": ctx.seed, **length_key(ctx.trainer)}
    order = ctx.seed if seed is None else seed
    if order != ctx.seed:  # absent otherwise: the run's own order is one entry, whose key is what it was before
        key["align_seed"] = order

    def build(out: Path) -> None:
        pl.seed_everything(order, workers=True, verbose=False)
        model, tokenizer = load_model_dir(base_dir, key="base model", options=ctx.load)
        log.info("safety alignment on %d examples%s", len(ctx.bundle.align),
                 "" if seed is None else f" (align.seed={seed})")
        _sft_and_save(dataclasses.replace(ctx, seed=order), model, tokenizer, ctx.bundle.align, "align", optim, out,
                      key, work_dir(ctx.cache_root, "align", key) / "checkpoints", parent=base_dir)

    return cached_dir(ctx.cache_root, "align", key, build) / "model"


@dataclass(frozen=True)
class DefenseSpec:
    """A defense applied after alignment (``conf/defense``): ``sft`` means none beyond alignment."""

    name: str = "sft"
    params: dict = dataclasses.field(default_factory=dict)
    optim: OptimConfig | None = None
    label: str = ""  # how reports name it (e.g. "seam-tuned"); the method's name when empty
    parsed: Any = None  # ``params`` as the defense's parameter dataclass, parsed once when the config is checked
    seed: int | None = None  # the defense stage's own seed (its data order); None: the run's seed
    trap_check: Any = None  # defense.trap_check as a TrapCheckConfig (the red team at epoch ends); None: off

    @property
    def display_name(self) -> str:
        return self.label or self.name


def defended_model_dir(ctx: StageContext, aligned_dir: Path, defense: DefenseSpec, evaluate,
                       make_evaluator=None) -> Path:
    """The released model of ``defense`` applied to ``aligned_dir``: :func:`trained_defense_dir`'s, or with
    ``defense.trap_check.fallback`` / ``reseed`` the one its red team chooses among the settings tried in turn: the
    configured one, each fallback's params, then the configured params with other defense seeds (each one a cached
    entry of its own, keyed as a plain check of that setting). With ``utility_check`` a setting qualifies only if
    it also keeps that share of the aligned model's utility (:func:`check_utility`)."""
    check = defense.trap_check
    if check is None or not (check.fallback or check.reseed):
        return trained_defense_dir(ctx, aligned_dir, defense, evaluate, make_evaluator)
    from selfdestruct.eval.red_team import RESEED_STEP, released_setting
    from selfdestruct.pipeline.defense import parse_params

    plain = dataclasses.replace(check, fallback=[], reseed=0, utility_check=None)
    settings = [({}, defense.seed), *((o, defense.seed) for o in check.fallback),
                *(({}, (ctx.seed if defense.seed is None else defense.seed) + k * RESEED_STEP)
                  for k in range(1, check.reseed + 1))]
    aligned_utility = None if check.utility_check is None else check_utility(ctx, aligned_dir, check, make_evaluator)
    models, wins, kept = [], [], []
    for overrides, defense_seed in settings:
        params = {**defense.params, **overrides}
        setting = dataclasses.replace(defense, params=params, parsed=parse_params(defense.name, params),
                                      trap_check=plain, seed=defense_seed)
        models.append(trained_defense_dir(ctx, aligned_dir, setting, evaluate, make_evaluator))
        wins.append(read_provenance(models[-1])["trap_check"][-1]["no_win"])
        passed, note = (True, "") if aligned_utility is None else \
            passes_utility_check(ctx, models[-1], check, aligned_utility, make_evaluator)
        kept.append(passed)
        log.info("defense.trap_check: params overrides %s, defense seed %s: no-win in %d of the red team's %d cells%s",
                 overrides or "none", "the run's" if defense_seed is None else defense_seed, wins[-1], check.num_cells,
                 note)
        if wins[-1] >= check.fallback_at and kept[-1]:
            break
    best = released_setting(wins, check.fallback_at, kept)
    overrides, defense_seed = settings[best]
    log.info("defense.trap_check: releasing setting %d of %d tried (%s, defense seed %s)", best + 1, len(models),
             overrides or "the configured params", "the run's" if defense_seed is None else defense_seed)
    if not (wins[best] >= check.fallback_at and kept[best]):
        log.warning("defense.trap_check: no setting tried qualified (%d of the red team's %d cells%s); the released "
                    "one won %d: expect its trap to be shallow. On the embedded default some pre-trained bases (the "
                    "run's seed) give a shallow trap whatever the alignment or the defense's data order: on two such "
                    "bases 1 of 10 retries reached 8 (experiments/nowin/README.md, block realign_51_54)",
                    check.fallback_at, check.num_cells, "" if aligned_utility is None else " and the utility check",
                    wins[best])
    return models[best]


def passes_utility_check(ctx: StageContext, model_dir: Path, check, aligned_utility: float,
                         make_evaluator) -> tuple[bool, str]:
    """Whether the model in ``model_dir`` keeps ``check.utility_check`` x the aligned model's utility (1 where the
    aligned model has none to keep), and what to log of it."""
    utility = check_utility(ctx, model_dir, check, make_evaluator)
    ratio = utility / aligned_utility if aligned_utility > 0 else 1.0
    passed = ratio >= check.utility_check
    return passed, (f"; utility {ratio:.3f} x the aligned model's on the {check.utility_check_tasks} tasks "
                    f"({'passes' if passed else 'fails'} the utility check, >= {check.utility_check:g})")


def check_utility(ctx: StageContext, model_dir: Path, check, make_evaluator) -> float:
    """``defense.trap_check.utility_check``'s measurement: the utility of the model in ``model_dir`` on the red
    team's benign split of ``check.utility_check_tasks``, before any attack (as ``experiments/nowin/red_team.py
    --before-only`` measures it), computed once per model, split and evaluation (``ctx.eval_key``) and cached (with
    its harmful score)."""
    import json

    from selfdestruct.eval.red_team import before_attack
    from selfdestruct.utils.io import write_json_atomic

    split = check.utility_check_split()
    key = {"stage": "utility-check", "version": CACHE_VERSION, "model": checkpoint_id(model_dir),
           "tasks": split.utility_tasks, "num_eval_benign": split.num_eval_benign,
           "num_eval_harmful": split.num_eval_harmful, "num_train": split.num_train, **ctx.eval_key}

    def build(out: Path) -> None:
        model, tokenizer = load_model_dir(model_dir, key="utility check", options=ctx.load)
        write_json_atomic(out / "pre.json", before_attack(model, make_evaluator(tokenizer),
                                                          trap_check_data(ctx.bundle, split)))

    return json.loads((cached_dir(ctx.cache_root, "eval", key, build) / "pre.json").read_text())["utility"]


def trained_defense_dir(ctx: StageContext, aligned_dir: Path, defense: DefenseSpec, evaluate,
                        make_evaluator=None) -> Path:
    """The model of ``defense`` applied to ``aligned_dir``, built once per configuration and cached.

    Its provenance records the defense and the aligned model's own evaluation (the no-win criterion's
    reference), so an attack on it needs nothing else, and the trap checks' results (``defense.trap_check``;
    ``make_evaluator(tokenizer)`` gives the evaluator whose judge they use).
    """
    from selfdestruct.defenses import DEFENSES

    optim = defense.optim.cache_key() if defense.optim else None
    params = DEFENSES[defense.name].key_params(defense.params) if defense.name in DEFENSES else defense.params
    key = {"stage": "defend", "version": CACHE_VERSION, "aligned": checkpoint_id(aligned_dir), "defense": defense.name,
           "label": defense.display_name,
           "params": params, "optim": optim, "seed": ctx.seed, **length_key(ctx.trainer)}
    if defense.seed is not None:  # absent otherwise, so that the entries cached before the option keep their keys
        key["defense_seed"] = defense.seed
    if defense.trap_check is not None:  # likewise
        key["trap_check"] = defense.trap_check.cache_key()
    seed = ctx.seed if defense.seed is None else defense.seed

    def build(out: Path) -> None:
        pl.seed_everything(seed, workers=True, verbose=False)
        model, tokenizer = load_model_dir(aligned_dir, key="aligned model", options=ctx.load)
        aligned_metrics, _ = evaluate(model, tokenizer, "aligned")
        check = None
        if defense.name != "sft":
            from selfdestruct.pipeline.defense import TrapCheck, apply_defense

            if defense.trap_check is not None:
                check = TrapCheck(defense.trap_check, tokenizer, ctx.fmt, make_evaluator(tokenizer),
                                  trap_check_data(ctx.bundle, defense.trap_check), seed,
                                  threads=ctx.trainer.branch_threads)
            csv = CSVLogger(save_dir=str(out), name="csv", version="")
            stage = dataclasses.replace(ctx, loggers=[csv, *ctx.loggers], run_dir=ctx.run_dir or out, seed=seed)
            model = apply_defense(model, tokenizer, stage, defense.name, defense.parsed or defense.params,
                                  defense.optim, ckpt_dir=work_dir(ctx.cache_root, "defend", key) / "checkpoints",
                                  ckpt_key=key, trap_check=check)
        provenance = {"stage": "defend", "defense": defense.display_name, "method": defense.name, "seed": ctx.seed,
                      "defense_seed": seed,
                      "aligned_metrics": aligned_metrics, "aligned_model": str(aligned_dir), "key": key,
                      "made_in": made_in(aligned_dir, "defend" if defense.name != "sft" else None)}
        aligned_key = read_provenance(aligned_dir).get("key", {})
        if aligned_key.get("stage") == "align":  # the alignment's own data order (align.seed; else the run's seed)
            provenance["align_seed"] = aligned_key.get("align_seed", aligned_key.get("seed"))
        if check is not None:
            provenance["trap_check"] = check.results
        save_model_dir(model, tokenizer, out / "model", provenance)

    return cached_dir(ctx.cache_root, "defend", key, build) / "model"


def trap_check_data(bundle, cfg):
    """The red team's data for ``defense.trap_check`` (checked before any training: too few is a UserError), and
    with ``utility_check`` the utility check's split checked too."""
    from selfdestruct.errors import FieldError
    from selfdestruct.eval.red_team import red_team_data
    from selfdestruct.pipeline.streams import benign_tasks

    def split(check):
        tasks = bundle.validation_benign if check.utility_tasks == "validation" else benign_tasks(bundle.align)
        try:
            return red_team_data(bundle.defense_harmful, tasks, check)
        except FieldError as err:
            raise err.under("defense.trap_check") from None

    if cfg.utility_check is not None:
        try:
            split(cfg.utility_check_split())
        except UserError as err:
            raise UserError(f"{err} (the utility check's tasks: defense.trap_check.utility_check_tasks="
                            f"{cfg.utility_check_tasks})") from None
    return split(cfg)


def run_attack(model, tokenizer, examples: list[Example], attack: AttackConfig, trainer_cfg: TrainerConfig,
               loggers: list[Logger], run_dir: Path, seed: int, fmt: PromptFormat, ckpt_key: Any = None):
    """Fine-tune ``model`` on ``examples`` as the attacker would; returns the attacked plain HF model.

    ``seed`` orders the batches (the caller passes ``attack.seed`` when it is set, else the run's seed).
    Checkpoints go to ``run_dir/checkpoints``; a re-run of the same ``ckpt_key`` resumes from them."""
    pl.seed_everything(seed, workers=True, verbose=False)
    module = AttackModule(model, attack)
    datamodule = _single_stream(examples, tokenizer, attack, fmt, seed)
    trainer = fit(module, datamodule, trainer_cfg, attack.epochs, loggers, run_dir, ckpt_dir=run_dir / "checkpoints",
                  ckpt_key=ckpt_key)
    log.info("attack: %d optimiser steps on %d examples", trainer.global_step, len(examples))
    return module.export_model()
