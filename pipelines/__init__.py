"""Training recipes (TOML), installed as the package data of ``multiscale_dali.recipes``.

This folder is the project's published place for recipes; setup.cfg maps it into the package so that a
wheel or a non-editable install carries them. ``msdali recipes`` lists them; ``--config NAME`` picks one.
"""
