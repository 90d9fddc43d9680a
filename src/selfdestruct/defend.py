"""``python -m selfdestruct.defend``: base model → safety alignment → defense; writes model/ and metrics.json.

The entry point only, light on purpose: Hydra composes and checks the config first, so ``--help``, ``--cfg job``
and a mistyped key answer in about a second; torch, Lightning and transformers are imported after that, with the
work in :mod:`selfdestruct.commands.defend`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from selfdestruct import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="defend")
def main(cfg: DictConfig) -> None:
    from selfdestruct.commands.defend import run

    run(cfg)


if __name__ == "__main__":
    main()
