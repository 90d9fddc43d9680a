"""The work of ``python -m selfdestruct.attack model_path=DIR``: evaluate, fine-tune as an attacker, evaluate again."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfdestruct import cli_config as checks
from selfdestruct.data.real import take
from selfdestruct.errors import UserError
from selfdestruct.eval.objective import AttackObjective, attack_success
from selfdestruct.models.files import check_model_location
from selfdestruct.pipeline.config import AttackConfig
from selfdestruct.utils.cache import cached_dir
from selfdestruct.utils.io import write_json_atomic
from selfdestruct.utils.job import complete_metrics, hydra_output_dir, identity_overrides, run_job
from selfdestruct.utils.provenance import environment
from selfdestruct.utils.run_metrics import METRICS_FILE, AttackRecord, RunMetrics, red_team_record

log = logging.getLogger("selfdestruct.attack")


def attack_config(cfg: DictConfig) -> AttackConfig:
    if OmegaConf.is_missing(cfg.attack, "lr") or "lr" not in cfg.attack:
        raise UserError("attack.lr is not set: choose intensity=weak|medium|strong or give attack.lr=...")
    return checks.to_dataclass(AttackConfig, cfg.attack, "attack")


def attack_objective(cfg: DictConfig) -> AttackObjective:
    return checks.to_dataclass(AttackObjective, cfg.objective, "objective")


def search_metrics(pre: dict, post: dict, objective: AttackObjective) -> dict:
    """metrics.json's ``search`` section: the value sweep=attack_search maximises, and what it was computed with."""
    success = attack_success(post.get("harmful_score"), post.get("utility"), pre.get("utility"),
                             objective.utility_floor)
    return {"attack_success": success, "utility_floor": objective.utility_floor}


def attack_examples(bundle, spec: AttackConfig, seed: int) -> list:
    """The attacker's data: harmful pairs, the benign task, or benign data poisoned with a share of harmful pairs."""
    if spec.data == "harmful":
        return take(bundle.attack_pool, spec.num_samples, "attack.num_samples")
    if spec.data == "benign":
        return take(bundle.finetune_pool, spec.num_samples, "attack.num_samples")
    num_harmful = round(spec.poison_ratio * spec.num_samples)
    mixed = (take(bundle.attack_pool, num_harmful, "attack.num_samples*attack.poison_ratio")
             + take(bundle.finetune_pool, spec.num_samples - num_harmful, "attack.num_samples*(1-attack.poison_ratio)"))
    random.Random(seed).shuffle(mixed)
    return mixed


def pre_attack_evaluation(cfg: DictConfig, model_path, run):
    """The pre-attack evaluation of ``model_path``, computed once per model, evaluation set and numerical
    environment and shared by every cell that attacks that model (greedy decoding: the same numbers each time)."""
    from selfdestruct import cli_common as cc
    from selfdestruct.pipeline.stages import CACHE_VERSION, checkpoint_id

    key = {"stage": "pre-attack", "version": CACHE_VERSION, "model": checkpoint_id(Path(model_path)),
           **cc.evaluation_key(cfg)}

    def build(out: Path) -> None:
        metrics, samples = run()
        write_json_atomic(out / "pre.json", {"metrics": metrics, "samples": samples})

    entry = json.loads((cached_dir(checks.cache_root(cfg), "eval", key, build) / "pre.json").read_text())
    return entry["metrics"], entry["samples"]


def attack(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "model_path"):
        raise UserError("model_path is required: give model_path=DIR, the model/ directory written by "
                        "selfdestruct.defend, or model_path=defend to build (or reuse from the cache) the "
                        "model of this config's defense")
    run_dir = hydra_output_dir()
    done = complete_metrics(run_dir, ("defense", "attack", "pre", "post"))
    if done is not None and not cfg.force:
        log.info("%s is complete; skipping (force=true recomputes)", run_dir / METRICS_FILE)
        return {**done, "search": search_metrics(done["pre"], done["post"], attack_objective(cfg))}
    checks.check_launch(cfg)
    builds = checks.STAGE_NODES if cfg.model_path == "defend" else ()  # model_path=defend builds the stages too
    checks.check_added_keys(cfg, checks.ATTACK_NODES + builds)
    spec = attack_config(cfg)  # every attack field checked (AttackConfig.__post_init__)
    objective = attack_objective(cfg)
    trainer = checks.trainer_config(cfg)
    checks.check_eval_device(cfg)
    bundle = checks.data_bundle(cfg)
    attack_seed = int(cfg.seed) if spec.seed is None else spec.seed  # the defended model keeps the run's seed
    examples = attack_examples(bundle, spec, attack_seed)
    if cfg.model_path == "defend":  # the stages this cell would build: their settings (the defense's follow)
        checks.check_stage_settings(cfg)
    else:  # model files checked before any training (after the data they are used with)
        check_model_location(cfg.model_path, "model_path")
    # Every check above runs without torch (about a second for bad input); the work imports it from here on.
    from selfdestruct import cli_common as cc
    from selfdestruct.models.io import load_model_dir, read_provenance, save_model_dir
    from selfdestruct.pipeline.stages import checkpoint_id, made_in, run_attack
    from selfdestruct.utils.loggers import log_summary

    defense = None
    if cfg.model_path == "defend":  # the defense's parameters, checked before any work too
        defense = cc.defense_spec(cfg)
    loggers = cc.job_loggers(cfg, run_dir)
    model_path = cc.defended_dir(cfg, bundle, loggers, run_dir, defense) if defense else cfg.model_path
    model, tokenizer = load_model_dir(model_path, key="model_path", options=cc.load_options(cfg))
    provenance = read_provenance(model_path)
    evaluate = cc.evaluator(cfg, tokenizer, bundle)
    pre, pre_samples = pre_attack_evaluation(cfg, model_path, lambda: evaluate(model, "pre-attack"))
    ckpt_key = {"overrides": identity_overrides(), "model": checkpoint_id(Path(model_path))}
    attacked = run_attack(model, tokenizer, examples, spec, trainer, loggers, run_dir,
                          attack_seed, checks.prompt_format(cfg), ckpt_key=ckpt_key)
    post, post_samples = evaluate(attacked, "post-attack")
    if cfg.save_model:
        save_model_dir(attacked, tokenizer, run_dir / "model", {**provenance, "stage": "attack",
                                                                "attack": checks.resolved_config(cfg.attack),
                                                                "made_in": made_in(Path(model_path), "attack")})
    search = search_metrics(pre, post, objective)
    log_summary(loggers, {**{f"pre/{k}": v for k, v in pre.items()}, **{f"post/{k}": v for k, v in post.items()},
                          **{f"search/{k}": v for k, v in search.items()}})
    write_json_atomic(run_dir / "samples.json", {"pre": pre_samples, "post": post_samples})
    record = AttackRecord(kind=spec.name, lr=spec.lr, num_samples=spec.num_samples, epochs=spec.epochs,
                          poison_ratio=spec.poison_ratio,
                          config=dataclasses.asdict(spec))
    metrics = RunMetrics(defense=provenance.get("defense", "unknown"), seed=int(cfg.seed), pre=pre, attack=record,
                         post=post, search=search, aligned=provenance.get("aligned_metrics", {}),
                         model_path=str(model_path), overrides=identity_overrides(),
                         environment=environment(), red_team=red_team_record(provenance),
                         made_in=provenance.get("made_in")).write(run_dir)
    if not cfg.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    log.info("metrics: %s", run_dir / METRICS_FILE)
    return metrics


def run(cfg: DictConfig) -> float | None:
    """One job of the command: the attack's success, or None for a failed run (a failed trial to the sweeper)."""
    metrics = run_job(lambda: attack(cfg), hydra_output_dir())
    return metrics["search"]["attack_success"] if metrics else None
