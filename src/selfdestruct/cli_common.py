"""What the commands share once torch is imported: the evaluator, the defense's parameters, the stages of a run.

The checks that need no torch are in :mod:`selfdestruct.cli_config`; each command runs those first. With it, this
is the only layer besides the entry points that reads a ``DictConfig``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from selfdestruct.cli_config import (align_seed, cache_root, check_eval_device, data_key, model_arch, optim_config,
                                     prompt_format, resolved_config, stage_seed, to_dataclass, trainer_config)
from selfdestruct.data.sources import DataBundle
from selfdestruct.errors import UserError
from selfdestruct.eval.evaluator import Evaluator
from selfdestruct.eval.judges import KeywordJudge, OracleJudge
from selfdestruct.models.io import LoadOptions
from selfdestruct.objectives.ctrap import collapse_token_id
from selfdestruct.pipeline.config import OptimConfig
from selfdestruct.pipeline.stages import (DefenseSpec, aligned_model_dir, base_model_dir, defended_model_dir,
                                         trap_check_data)
from selfdestruct.pipeline.training import StageContext
from selfdestruct.utils.loggers import build_loggers
from selfdestruct.utils.provenance import environment, numerics_fingerprint

log = logging.getLogger(__name__)


def load_options(cfg: DictConfig) -> LoadOptions:
    """How checkpoints of this run load: the hf model group's settings, or fp32 for the embedded default."""
    if cfg.model.get("source") != "hf":
        return LoadOptions()
    m = cfg.model
    return LoadOptions(dtype=str(m.dtype), attn_implementation=m.attn_implementation,
                       gradient_checkpointing=bool(m.gradient_checkpointing), trust_remote_code=bool(m.trust_remote_code))


def evaluator(cfg: DictConfig, tokenizer, bundle: DataBundle) -> Evaluator:
    judge = make_judge(cfg, bundle)
    try:
        collapse_id = collapse_token_id(tokenizer, cfg.eval.collapse_word, rule=cfg.eval.get("collapse_token", "published"))
    except ValueError as exc:
        raise UserError(f"eval.collapse_word / eval.collapse_token: {exc}") from None
    lm_eval = cfg.eval.get("lm_eval") or {}
    return Evaluator(lm_eval_tasks=list(lm_eval.get("tasks") or []), lm_eval_limit=lm_eval.get("limit"),
                     tokenizer=tokenizer, sets=bundle.eval_sets.limited(cfg.eval.max_examples), judge=judge,
                     max_new_tokens=int(cfg.eval.max_new_tokens), batch_size=int(cfg.eval.batch_size),
                     collapse_token_id=collapse_id, fmt=prompt_format(cfg),
                     show_progress=bool(cfg.trainer.progress_bar), device=eval_device(cfg))


def evaluation_key(cfg: DictConfig) -> dict:
    """What identifies an evaluation of a given model, for the keys of cached evaluations: the evaluation's settings,
    the data and the numerical environment (greedy decoding gives the same numbers for the same three)."""
    evaluated = {k: v for k, v in resolved_config(cfg.eval).items() if k != "device"}
    if (device := eval_device(cfg)) != "cpu":  # CPU keys stay those of the runs made before eval.device existed
        evaluated["device"] = device
    return {"eval": evaluated, "data": data_key(cfg), "environment": numerics_fingerprint(environment())}


def eval_device(cfg: DictConfig) -> str:
    """``eval.device``: auto = the GPU when the trainer may use one and CUDA is there, else the CPU."""
    choice = check_eval_device(cfg)
    if choice == "auto":
        gpu_allowed = str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda")
        return "cuda" if gpu_allowed and torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"eval.device={choice} but CUDA is not available on this machine (use auto or cpu)")
    return choice


def make_judge(cfg: DictConfig, bundle: DataBundle):
    """The harmful-score judge named by ``eval.judge``; model-based judges are imported only when chosen."""
    name = cfg.eval.judge
    if name == "oracle":
        if not bundle.lexicon:
            raise UserError("eval.judge=oracle needs the synthetic world; use eval.judge=keyword|classifier|chat")
        return OracleJudge(bundle.lexicon)
    if name == "keyword":
        return KeywordJudge()
    if name == "classifier":
        from selfdestruct.eval.classifier_judge import ClassifierJudge

        options = OmegaConf.to_container(cfg.eval.classifier, resolve=True)
        if not options.get("path"):
            raise UserError("eval.judge=classifier needs eval.classifier.path=DIR (a local HF classifier)")
        return ClassifierJudge(**options)
    if name == "chat":
        from selfdestruct.eval.chat_judge import ChatJudge

        return ChatJudge(**OmegaConf.to_container(cfg.eval.chat, resolve=True))
    raise UserError(f"eval.judge={name!r}: expected one of oracle, keyword, classifier, chat")


def defense_spec(cfg: DictConfig) -> DefenseSpec:
    node = cfg.defense
    unknown = sorted(set(node) - {"name", "label", "params", "optim", "seed", "trap_check"})
    if unknown:
        raise UserError(f"defense.{unknown[0]}: unknown option (known: name, label, params, optim, seed, trap_check)")
    seed = stage_seed(node, "defense.seed")
    if seed is not None and node.name == "sft":
        raise UserError(f"defense.seed={seed}: defense=sft trains nothing, so it has no seed of its own")
    params = OmegaConf.to_container(node.params, resolve=True) if node.get("params") else {}
    optim = to_dataclass(OptimConfig, node.optim, "defense.optim") if node.get("optim") else None
    if node.name == "sft" and optim is not None:
        raise UserError("defense.optim: defense=sft trains nothing, so it has no optimiser of its own")
    if node.name != "sft" and optim is None:
        raise UserError(f"defense={node.name}: defense.optim is missing (the optimiser of the defense stage)")
    from selfdestruct.pipeline.defense import parse_params

    parsed = parse_params(str(node.name), params)  # every defense parameter checked before any work, once
    trap_check = None
    if node.get("trap_check") is not None:
        if node.name == "sft":
            raise UserError("defense.trap_check: defense=sft trains nothing, so there are no epochs to check")
        from selfdestruct.eval.red_team import TrapCheckConfig

        trap_check = to_dataclass(TrapCheckConfig, node.trap_check, "defense.trap_check")
        for i, overrides in enumerate(trap_check.fallback):  # each fallback setting checked before any work too
            try:
                parse_params(str(node.name), {**params, **overrides})
            except UserError as err:
                raise UserError(f"defense.trap_check.fallback[{i}]: {err}") from None
    return DefenseSpec(name=str(node.name), params=params, optim=optim, label=str(node.get("label") or node.name),
                       parsed=parsed, seed=seed, trap_check=trap_check)


def defended_dir(cfg: DictConfig, bundle: DataBundle, loggers, run_dir: Path, spec: DefenseSpec | None = None) -> Path:
    """Base → alignment → defense, each stage built once per configuration and shared through the cache; ``spec``
    is :func:`defense_spec`'s result (checked again from ``cfg`` when not given)."""
    spec = spec or defense_spec(cfg)
    if spec.trap_check is not None:  # enough of the defender's data for the red team, before any stage runs
        trap_check_data(bundle, spec.trap_check)
    ctx = StageContext(bundle=bundle, trainer=trainer_config(cfg), seed=int(cfg.seed), fmt=prompt_format(cfg),
                       cache_root=cache_root(cfg), data_key=data_key(cfg), loggers=list(loggers or []),
                       run_dir=run_dir, load=load_options(cfg), eval_key=evaluation_key(cfg))
    if cfg.model.get("source") == "hf":
        if OmegaConf.is_missing(cfg.model, "path") or not cfg.model.path:
            raise UserError("model.path is required with model=hf: a local Hugging Face checkpoint directory")
        base = Path(cfg.model.path).expanduser()
        aligned = (aligned_model_dir(ctx, base, optim_config(cfg, "align"), align_seed(cfg)) if cfg.model.align
                   else base)
    else:
        embedded = dataclasses.replace(ctx, load=LoadOptions())  # a model built from config loads as saved
        base = base_model_dir(embedded, model_arch(cfg), optim_config(cfg, "pretrain"))
        aligned = aligned_model_dir(embedded, base, optim_config(cfg, "align"), align_seed(cfg))

    def make_evaluator(tokenizer):
        return evaluator(cfg, tokenizer, bundle)

    def evaluate(model, tokenizer, stage: str):
        return make_evaluator(tokenizer)(model, stage)

    if spec.name != "sft" and "fsdp" in str(cfg.trainer.strategy):
        raise UserError(f"defense={spec.name} with trainer.strategy={cfg.trainer.strategy}: the defenses need "
                        "whole gradients on every rank; use trainer=ddp (sharded training is for SFT and attacks)")
    return defended_model_dir(ctx, aligned, spec, evaluate, make_evaluator=make_evaluator)


def job_loggers(cfg: DictConfig, run_dir: Path):
    wandb_cfg = cfg.logger.wandb
    return build_loggers(run_dir, wandb_mode=wandb_cfg.mode, project=wandb_cfg.project, entity=wandb_cfg.entity,
                         group=wandb_cfg.group, job_type=cfg.stage, tags=list(wandb_cfg.tags),
                         config=resolved_config(cfg))


