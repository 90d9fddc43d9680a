"""Config → typed objects, and every check of a command that needs neither torch nor the models.

The commands run these first, before importing torch, Lightning or transformers (about ten seconds), so bad input
(a value out of range, a missing or malformed file, too few examples) is refused in about a second. What needs
torch (the defense's parameters, the evaluator, the stages) is in :mod:`selfdestruct.cli_common`. Like it, this is
the only layer besides the entry points that reads a ``DictConfig``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from selfdestruct import CONF_DIR
from selfdestruct.data.formatting import PromptFormat
from selfdestruct.data.real import load_dataset_file
from selfdestruct.data.sources import DataBundle, files_bundle, synthetic_bundle
from selfdestruct.data.synthetic import WorldConfig
from selfdestruct.errors import UserError, build_config
from selfdestruct.models.arch import TinyLlamaConfig
from selfdestruct.models.files import check_model_location
from selfdestruct.pipeline.config import OptimConfig, TrainerConfig
from selfdestruct.utils.cache import default_cache_root

log = logging.getLogger(__name__)

# The config nodes of the base -> alignment -> defense stages; a command that builds them reads these.
STAGE_NODES = ("model", "pretrain", "align", "trainer", "defense")
# The nodes the attack command reads through dataclasses (with model_path=defend, STAGE_NODES too).
ATTACK_NODES = ("attack", "objective", "trainer")
_ABSENT = object()  # OmegaConf.select's answer for a key a config file does not hold


def to_dataclass(cls, node: DictConfig | dict, key: str, drop: tuple[str, ...] = ()):
    """Build ``cls`` from a config node; an unknown field is an error naming ``key.field``."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    for name in drop:
        values.pop(name, None)
    return build_config(cls, values, key)


def model_arch(cfg: DictConfig) -> TinyLlamaConfig:
    """The embedded model's architecture (``model=tiny|micro|small|medium``)."""
    return to_dataclass(TinyLlamaConfig, cfg.model, "model", drop=("name", "source"))


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    return to_dataclass(TrainerConfig, cfg.trainer, "trainer")


def optim_config(cfg: DictConfig, group: str) -> OptimConfig:
    """A stage's optimiser settings; the alignment's node also holds its own seed (:func:`align_seed`)."""
    return to_dataclass(OptimConfig, cfg[group], group, drop=("seed",) if group == "align" else ())


def stage_seed(node: DictConfig, key: str) -> int | None:
    """A stage's own seed (``key``: ``align.seed``, ``defense.seed``), its data order: an integer >= 0; None (null):
    the run's seed."""
    seed = node.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UserError(f"{key}={seed!r}: expected an integer >= 0 or null (null: the run's seed)")
    return seed


def align_seed(cfg: DictConfig) -> int | None:
    """``align.seed``: the alignment stage's own seed (:func:`stage_seed`)."""
    return stage_seed(cfg.align, "align.seed")


def prompt_format(cfg: DictConfig) -> PromptFormat:
    template = cfg.data.template
    if "{prompt}" not in template:
        raise UserError(f"data.template={template!r} must contain '{{prompt}}'")
    return PromptFormat(template)


def data_key(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the data of a run (part of every cache key and of a model's provenance)."""
    return OmegaConf.to_container(cfg.data, resolve=True)


def data_bundle(cfg: DictConfig) -> DataBundle:
    source = cfg.data.source
    if source == "files":
        d = cfg.data
        for key in ("harmful_path", "benign_path"):
            if OmegaConf.is_missing(d, key) or not d[key]:
                raise UserError(f"data.{key} is required with data={cfg.data.get('name', 'files')}: a local file")
        return files_bundle(d.harmful_path, d.harmful_format, d.benign_path, d.benign_format, prompt_format(cfg),
                            int(d.eval_harmful), int(d.eval_benign), int(d.split_seed), d.get("attack_file"),
                            d.get("attack_file_format"))
    if source != "synthetic":
        raise UserError(f"data.source={source!r}: expected 'synthetic' or 'files'")
    world = WorldConfig(seed=int(cfg.data.world_seed), disjoint_categories=bool(cfg.data.disjoint_categories))
    bundle = synthetic_bundle(world, prompt_format(cfg))
    if cfg.data.get("attack_file"):
        loaded = load_dataset_file(cfg.data.attack_file_format, cfg.data.attack_file)
        log.info("%s", loaded.summary())
        bundle.attack_pool = list(loaded.examples)
    return bundle


def cache_root(cfg: DictConfig) -> Path:
    return Path(cfg.paths.cache_dir).expanduser() if cfg.paths.cache_dir else default_cache_root()


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def check_eval_device(cfg: DictConfig) -> str:
    """``eval.device`` is one of auto, cpu, cuda, cuda:N (whether CUDA is there is asked once torch is imported:
    ``cli_common.eval_device``)."""
    choice = str(cfg.eval.get("device", "auto"))
    if choice not in ("auto", "cpu", "cuda") and not choice.startswith("cuda:"):
        raise UserError(f"eval.device={choice}: expected auto, cpu, cuda or cuda:N")
    return choice


def check_stage_settings(cfg: DictConfig) -> None:
    """The settings of the base -> alignment stages (trainer, optimisers, the embedded model's architecture, a local
    ``model.path``), before any work; the defense's parameters follow once torch is imported
    (``cli_common.defense_spec``)."""
    check_branch_threads(trainer_config(cfg))
    check_eval_device(cfg), optim_config(cfg, "pretrain"), optim_config(cfg, "align")
    if align_seed(cfg) is not None and cfg.model.get("source") == "hf" and not cfg.model.get("align"):
        raise UserError(f"align.seed={cfg.align.seed}: model.align is false, so there is no alignment stage to seed "
                        "(model.align=true aligns the checkpoint first)")
    if cfg.model.get("source") != "hf":
        model_arch(cfg)
    elif not OmegaConf.is_missing(cfg.model, "path") and cfg.model.path:
        check_model_location(cfg.model.path, "model.path")


def check_added_keys(cfg: DictConfig, checked: tuple[str, ...]) -> None:
    """Refuse a key added with Hydra's ``+key=value`` (or ``++key=value``) that nothing would read.

    Hydra answers a mistyped ``eval.max_new_token=8`` with "use +eval.max_new_token=8"; run that way, the setting
    would be silently ignored. ``checked``: the nodes this command reads through a dataclass or a list of known
    keys (``build_config``, ``cli_common.defense_spec``), which refuse an unknown key themselves, naming the known
    ones; a key added anywhere else (``eval``, ``data``, ``logger``, ``paths``, the top level, a node the command
    does not read) is refused here, unless a config file of the run declares it. ``+group=option`` adds a config,
    not a key: it is refused when the command's own config lists no such group (the defend command reads no
    ``attack``, the evaluate command no ``defense``), since nothing of the command would read what it adds."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if cfg.model.get("source") == "hf":  # the hf model's keys are read one by one, not through a dataclass
        checked = tuple(node for node in checked if node != "model")
    choices = hydra_cfg.runtime.choices
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()):
            continue
        if key in choices:
            _check_added_group(key, override, str(hydra_cfg.job.config_name))
            continue
        if key.split(".")[0] in checked:
            continue
        if _declared(key, str(hydra_cfg.job.config_name), choices):  # `+` may set a key a config file holds as null
            continue
        node, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, node) if node else None
        known = [k for k in sorted(parent) if k != name] if OmegaConf.is_dict(parent) else []
        hint = f" (known keys of {node}: {', '.join(known)})" if known else ""
        plus = "++" if override.is_force_add() else "+"
        raise UserError(f"{plus}{key}: no setting of this command reads {key}, so it would change nothing{hint}")


def _check_added_group(group: str, override, config_name: str) -> None:
    """``+group=option``: refused unless the command's config file lists ``group`` in its defaults."""
    if group.startswith("hydra"):
        return  # Hydra's own groups (launcher, sweeper) configure the launch, which always reads them
    entries = (yaml.safe_load((Path(CONF_DIR) / f"{config_name}.yaml").read_text()) or {}).get("defaults", [])
    groups = [name.split()[-1] for entry in entries if isinstance(entry, dict) for name in entry]  # "optional sweep"
    if group.split("/")[0] not in groups:
        raise UserError(f"{override.input_line}: the {config_name} command reads no {group} config, so it would "
                        f"change nothing (its config groups: {', '.join(g for g in groups if g != 'hydra')})")


def _declared(key: str, config_name: str, choices) -> bool:
    """Whether one of the config files this run composed (the command's, each group's chosen option, an
    ``@package _global_`` experiment or sweep) declares ``key``."""
    files = [(Path(CONF_DIR) / f"{config_name}.yaml", "")]
    files += [(Path(CONF_DIR) / group / f"{option}.yaml", group) for group, option in choices.items()
              if option and group != "hydra" and not group.startswith("hydra/")]
    for path, package in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if text.startswith("# @package _global_"):
            package = ""
        if package and not key.startswith(package + "."):
            continue
        node = OmegaConf.create(yaml.safe_load(text) or {})
        if OmegaConf.select(node, key[len(package) + 1:] if package else key, default=_ABSENT) is not _ABSENT:
            return True
    return False


def check_branch_threads(trainer: TrainerConfig) -> None:
    """Concurrent branches (``trainer.branch_threads`` > 1) are threads of one process computing in fp32."""
    if trainer.branch_threads > 1 and (str(trainer.precision) not in ("32-true", "32") or str(trainer.devices) != "1"):
        raise UserError(f"trainer.branch_threads={trainer.branch_threads} runs a step's branches as threads of one "
                        f"process in fp32: it needs trainer.precision=32-true and trainer.devices=1 (got "
                        f"{trainer.precision}, {trainer.devices})")


def check_launch(cfg: DictConfig) -> None:
    """Refuse Lightning's re-launching ``ddp`` inside a Hydra multirun (it re-runs the whole sweep per rank)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    strategy = str(cfg.trainer.strategy)
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    if strategy.startswith("ddp") and "spawn" not in strategy and "submitit" not in launcher:
        raise UserError(f"trainer.strategy={strategy} inside a Hydra multirun re-launches the whole sweep in every "
                        "process: use hydra/launcher=slurm (submitit), trainer.strategy=ddp_spawn, or one device "
                        "per job (see README, 'Sweeps')")
