"""``msdali models``: the model registry, one line per model; ``--timm PATTERN``: timm's models."""

from __future__ import annotations

import click

from multiscale_dali.errors import ConfigError


def _list_timm(pattern: str, pretrained: bool) -> None:
    from multiscale_dali.models.registry import TIMM_PREFIX
    from multiscale_dali.models.timm_models import list_timm_models

    names = list_timm_models(pattern, pretrained=pretrained)
    if not names:
        click.echo(f"no timm model matches {pattern!r} (shell-style pattern, e.g. 'resnet*' or '*vit_small*')")
        return
    for name in names:
        click.echo(f"{TIMM_PREFIX}{name}")


@click.command()
@click.option("--timm", "timm_pattern", default=None, metavar="PATTERN",
              help="List timm models matching a shell-style pattern instead (e.g. 'resnet*'); needs the timm extra.")
@click.option("--pretrained", is_flag=True,
              help="With --timm: only models timm publishes weights for, with their tags (cached here or not).")
def models(timm_pattern: str | None, pretrained: bool) -> None:
    """List the available models (and the smallest scale of those that cannot run at any).

    Any timm model is available as --model timm:NAME (pip install 'multiscale-dali[timm]').
    """
    if timm_pattern is not None:
        _list_timm(timm_pattern, pretrained)
        return
    if pretrained:
        raise ConfigError("pretrained", "applies to --timm PATTERN only (every registry model lists its weights)")
    from multiscale_dali.models.input_size import smallest_scale
    from multiscale_dali.models.registry import describe_models

    for name, description in describe_models():
        smallest = smallest_scale(name, num_outputs=1)
        limit = f"; scales >= {smallest} px" if smallest > 1 else ""
        click.echo(f"{name:<22} {description}{limit}")
    click.echo(f"{'timm:NAME':<22} any timm model (`msdali models --timm PATTERN`), needs the timm extra")
