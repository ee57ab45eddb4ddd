"""``msdali recipes``: the bundled TOML recipes and what each is for."""

from __future__ import annotations

import click

from multiscale_dali.errors import ConfigError
from multiscale_dali.training.config import bundled_recipes, load_recipe


@click.command()
def recipes() -> None:
    """List the bundled TOML recipes (the project's pipelines/); use one with --config NAME."""
    for name, path in bundled_recipes().items():
        try:
            _, description = load_recipe(path)
        except ConfigError as err:  # one broken recipe should not hide the others
            description = f"(invalid: {err.message})"
        click.echo(f"{name:<28} {description}")
