"""The diagnostic: the generation tree, its per-node signals and the run that builds them.

The files follow the README's numbered steps (docs/ARCHITECTURE.md draws the map).
"""
