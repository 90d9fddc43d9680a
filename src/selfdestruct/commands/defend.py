"""The work of ``python -m selfdestruct.defend``: base model → safety alignment → defense; writes model/ and
metrics.json."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from selfdestruct import cli_config as checks
from selfdestruct.utils.io import publish_dir, staging_dir, write_json_atomic
from selfdestruct.utils.job import complete_metrics, hydra_output_dir, identity_overrides, run_job
from selfdestruct.utils.provenance import environment
from selfdestruct.utils.run_metrics import METRICS_FILE, RunMetrics, red_team_record

log = logging.getLogger("selfdestruct.defend")


def _copy_model(src: Path, dst: Path) -> None:
    tmp = staging_dir(dst)
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    publish_dir(tmp, dst)


def defend(cfg: DictConfig) -> dict:
    run_dir = hydra_output_dir()
    done = complete_metrics(run_dir, ("defense", "pre"))
    if done is not None and not cfg.force:
        log.info("%s is complete; skipping (force=true recomputes)", run_dir / METRICS_FILE)
        return done
    checks.check_launch(cfg)
    checks.check_added_keys(cfg, checks.STAGE_NODES)
    checks.check_stage_settings(cfg)
    bundle = checks.data_bundle(cfg)
    # Every check above runs without torch (about a second for bad input); the work imports it from here on.
    import pytorch_lightning as pl

    from selfdestruct import cli_common as cc
    from selfdestruct.models.io import load_model_dir, read_provenance
    from selfdestruct.models.tiny import count_parameters
    from selfdestruct.utils.loggers import log_summary

    spec = cc.defense_spec(cfg)  # the defense's parameters, checked before any work too
    loggers = cc.job_loggers(cfg, run_dir)
    defended = cc.defended_dir(cfg, bundle, loggers, run_dir, spec)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, tokenizer = load_model_dir(defended, key="defended model")
    pre, samples = cc.evaluator(cfg, tokenizer, bundle)(model, "defended")
    _copy_model(defended, run_dir / "model")
    log_summary(loggers, {f"defend/{k}": v for k, v in pre.items()})
    write_json_atomic(run_dir / "samples.json", {"pre": samples})
    provenance = read_provenance(defended)
    metrics = RunMetrics(defense=provenance.get("defense", cfg.defense.name), seed=int(cfg.seed), pre=pre,
                         aligned=provenance.get("aligned_metrics", {}), num_parameters=count_parameters(model),
                         model_path=str(run_dir / "model"), overrides=identity_overrides(),
                         environment=environment(), red_team=red_team_record(provenance),
                         made_in=provenance.get("made_in")).write(run_dir)
    log.info("defended model: %s", run_dir / "model")
    log.info("metrics: %s", run_dir / METRICS_FILE)
    return metrics


def run(cfg: DictConfig) -> None:
    run_job(lambda: defend(cfg), hydra_output_dir())
