"""``msdali models``: the model registry, one line per model."""

from __future__ import annotations

import click


@click.command()
def models() -> None:
    """List the available models (and the smallest scale of those that cannot run at any)."""
    from multiscale_dali.models.input_size import smallest_scale
    from multiscale_dali.models.registry import describe_models

    for name, description in describe_models():
        smallest = smallest_scale(name, num_outputs=1)
        limit = f"; scales >= {smallest} px" if smallest > 1 else ""
        click.echo(f"{name:<22} {description}{limit}")
