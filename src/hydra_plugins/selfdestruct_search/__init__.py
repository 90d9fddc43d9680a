"""The project's Hydra sweeper for ``sweep=attack_search`` (a plugin must live in the ``hydra_plugins`` package)."""
