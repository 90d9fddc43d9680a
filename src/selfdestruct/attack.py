"""``python -m selfdestruct.attack model_path=DIR``: evaluate, fine-tune as an attacker, evaluate again.

The entry point only, light on purpose: Hydra composes and checks the config first, so ``--help``, ``--cfg job``
and a mistyped key answer in about a second; torch, Lightning and transformers are imported after that, with the
work in :mod:`selfdestruct.commands.attack`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from selfdestruct import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="attack")
def main(cfg: DictConfig) -> float | None:
    """Returns the attack's success (metrics.json ``search.attack_success``), the value sweep=attack_search's
    sweeper maximises; None for a failed run."""
    from selfdestruct.commands.attack import run

    return run(cfg)


if __name__ == "__main__":
    main()
