"""The work of each command line entry point (``selfdestruct/attack.py`` and its siblings are only the Hydra
entry points, which import these after the config is composed)."""
