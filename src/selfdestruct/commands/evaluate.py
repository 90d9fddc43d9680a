"""The work of ``python -m selfdestruct.evaluate model_path=DIR``: the evaluation of SPEC §5 on one model, nothing
else."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from selfdestruct import cli_config as checks
from selfdestruct.errors import UserError
from selfdestruct.models.files import check_model_location
from selfdestruct.utils.io import write_json_atomic
from selfdestruct.utils.job import hydra_output_dir, run_job
from selfdestruct.utils.provenance import environment
from selfdestruct.utils.run_metrics import METRICS_FILE, RunMetrics

log = logging.getLogger("selfdestruct.evaluate")


def evaluate(cfg: DictConfig) -> dict:
    if OmegaConf.is_missing(cfg, "model_path"):
        raise UserError("model_path is required: give model_path=DIR, a model directory")
    run_dir = hydra_output_dir()
    checks.check_added_keys(cfg, ())
    checks.check_eval_device(cfg)
    bundle = checks.data_bundle(cfg)
    check_model_location(cfg.model_path, "model_path")
    # Every check above runs without torch (about a second for bad input); the work imports it from here on.
    import pytorch_lightning as pl

    from selfdestruct import cli_common as cc
    from selfdestruct.models.io import load_model_dir, read_provenance

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    model, tokenizer = load_model_dir(cfg.model_path, key="model_path", options=cc.load_options(cfg))
    pre, samples = cc.evaluator(cfg, tokenizer, bundle)(model, "evaluate")
    provenance = read_provenance(cfg.model_path)
    write_json_atomic(run_dir / "samples.json", {"pre": samples})
    metrics = RunMetrics(defense=provenance.get("defense", "unknown"), seed=int(cfg.seed), pre=pre,
                         model_path=str(cfg.model_path), environment=environment(),
                         made_in=provenance.get("made_in")).write(run_dir)
    log.info("metrics: %s", run_dir / METRICS_FILE)
    return metrics


def run(cfg: DictConfig) -> None:
    run_job(lambda: evaluate(cfg), hydra_output_dir())
