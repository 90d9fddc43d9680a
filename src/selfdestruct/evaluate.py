"""``python -m selfdestruct.evaluate model_path=DIR``: the evaluation of SPEC §5 on one model, nothing else.

The entry point only, light on purpose: Hydra composes and checks the config first, so ``--help``, ``--cfg job``
and a mistyped key answer in about a second; torch, Lightning and transformers are imported after that, with the
work in :mod:`selfdestruct.commands.evaluate`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from selfdestruct import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from selfdestruct.commands.evaluate import run

    run(cfg)


if __name__ == "__main__":
    main()
