"""PNG figures of a run directory: learning curves, the scale schedule, the resolution sweep.

Reads only the run's files (``metrics.jsonl``, ``config.json`` and, when ``msdali evaluate`` wrote
one, ``eval.json``), so it works on a finished run, on a run still training, and on a copy of a
run directory from another machine. Writes into ``RUN_DIR/plots``:

* ``training.png``: loss and accuracy per scale per epoch, train (solid) and val (dashed);
* ``schedule.png``: which scales each epoch trained at (the progressive ramp, or constant);
* ``resolution.png``: accuracy against evaluation resolution, as trained and with BatchNorm
  recalibrated when evaluated so, the ensemble as a horizontal line (only with ``eval.json``);
* ``summary.png``: all of the above in one figure (the one to paste into a report).

matplotlib is the optional ``plot`` extra. It is imported only here, through its object-oriented
API on an Agg canvas: no pyplot, so no global backend switch in a process that has its own (a
notebook), and no display needed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from multiscale_dali.errors import EXIT_FAILURE, UserError
from multiscale_dali.constants import CONFIG_FILE, EVAL_FILE, METRICS_FILE
from multiscale_dali.extras import MissingExtraError

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
DPI = 100
PANEL_SIZE = (5.2, 3.6)  # inches per panel
COLORMAP = "viridis"
VARIANT_STYLES = {"as_trained": ("as trained", "o", "-"), "bn_recalibrated": ("BN recalibrated", "s", "--")}


class PlotError(UserError, ValueError, exit_code=EXIT_FAILURE):
    """The run directory lacks what a figure needs; the message names the file."""


# ---------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class RunFiles:
    run_dir: Path
    epochs: list[dict[str, Any]]  # metrics.jsonl, one dict per epoch, in epoch order
    config: dict[str, Any]  # config.json ({} when absent)
    evaluation: dict[str, Any] | None  # eval.json

    @property
    def scales(self) -> list[int]:
        """Every scale any epoch trained or validated at, ascending."""
        found = {int(s) for record in self.epochs for part in ("train", "val") for s in record.get(part, {})}
        return sorted(found)


def read_run(run_dir: str | Path) -> RunFiles:
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise PlotError(f"{metrics} not found: not a run directory, or no epoch has finished yet")
    by_epoch: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PlotError(f"{metrics} line {number} is not JSON: {err}") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise PlotError(f"{metrics} line {number} is not an epoch record (an object with an integer 'epoch')")
        by_epoch[record["epoch"]] = record  # a resumed run's re-trained epoch replaces the old
    if not by_epoch:
        raise PlotError(f"{metrics} is empty: no epoch has finished yet")
    config_path, eval_path = run_dir / CONFIG_FILE, run_dir / EVAL_FILE
    config = _json_object(config_path)
    return RunFiles(run_dir=run_dir, epochs=[by_epoch[e] for e in sorted(by_epoch)],
                    config={} if config is None else config, evaluation=_json_object(eval_path))


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when there is no such file."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlotError(f"{path} is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise PlotError(f"{path} is not a JSON object")
    return value


def schedule_by_epoch(config: dict[str, Any], epochs: int) -> list[tuple[int, ...]]:
    """Scales of each epoch ``0 .. epochs-1`` from config.json's ``schedule`` stages."""
    stages = sorted((int(start), tuple(int(s) for s in scales)) for start, scales in config["schedule"]["stages"])
    return [next(scales for start, scales in reversed(stages) if start <= epoch) for epoch in range(epochs)]


# ---------------------------------------------------------------------------------------- panels
def _scale_colors(scales: list[int], colormap: Any) -> dict[int, Any]:
    # One colour per scale, the same in every panel; small to large = dark to light.
    span = max(len(scales) - 1, 1)
    return {scale: colormap(0.85 * i / span) for i, scale in enumerate(scales)}


def _metric_series(run: RunFiles, part: str, scale: int, metric: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in run.epochs:
        value = record.get(part, {}).get(str(scale), {}).get(metric)
        if value is not None and math.isfinite(value):
            xs.append(int(record["epoch"]) + 1)
            ys.append(float(value))
    return xs, ys


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "epoch 0.96" on short runs


def _draw_metric(ax: Any, run: RunFiles, colors: dict[int, Any], metric: str) -> None:
    for scale in run.scales:
        for part, style in (("train", "-"), ("val", "--")):
            xs, ys = _metric_series(run, part, scale, metric)
            if xs:  # progressive runs visit some scales in some epochs only: markers show lone points
                ax.plot(xs, ys, style, marker="o", markersize=3, color=colors[scale], label=f"{part} {scale}px")
    _integer_epochs(ax)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per scale (train solid, val dashed)")
    if metric == "accuracy":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)


def draw_loss(ax: Any, run: RunFiles, colors: dict[int, Any]) -> None:
    _draw_metric(ax, run, colors, "loss")


def draw_accuracy(ax: Any, run: RunFiles, colors: dict[int, Any]) -> None:
    _draw_metric(ax, run, colors, "accuracy")


def draw_schedule(ax: Any, run: RunFiles, colors: dict[int, Any]) -> None:
    epochs = int(run.config.get("config", {}).get("epochs", len(run.epochs)))
    if "schedule" in run.config:
        per_epoch = schedule_by_epoch(run.config, epochs)
    else:  # no config.json: what metrics.jsonl says was trained
        per_epoch = [tuple(record["scales"]) for record in run.epochs]
    for epoch, scales in enumerate(per_epoch, start=1):
        for scale in scales:
            ax.scatter([epoch], [scale], color=colors.get(scale, "black"), s=30, zorder=3)
    width = len(per_epoch[0]) if per_epoch else 0
    for slot in range(width):  # connect each slot across epochs: shows a ramp as a staircase
        ax.step(range(1, len(per_epoch) + 1), [scales[slot] for scales in per_epoch], where="post",
                color="grey", alpha=0.5, zorder=2)
    mode = run.config.get("config", {}).get("mode", "")
    _integer_epochs(ax)
    ax.set_yticks(sorted({s for scales in per_epoch for s in scales}))
    ax.set_ylabel("training scale (px)")
    ax.set_title(f"scale schedule{f' ({mode})' if mode else ''}")
    ax.grid(alpha=0.3)


def draw_resolution(ax: Any, run: RunFiles, colors: dict[int, Any]) -> None:
    evaluation = run.evaluation or {}
    # Flip-TTA rows (evaluate --tta flip) are another measurement of the same resolutions: the sweep
    # plots the plain ones, so figures of runs evaluated with and without TTA compare.
    rows = [row for row in evaluation.get("rows", []) if row.get("tta", "none") == "none"]
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    for variant in variants:
        label, marker, style = VARIANT_STYLES.get(variant, (variant, "o", "-"))
        singles = sorted((row["scale"], row["accuracy"]) for row in rows
                         if row["variant"] == variant and row["scale"] is not None)
        line = ax.plot([s for s, _ in singles], [a for _, a in singles], style, marker=marker, label=label)[0]
        ensemble = next((row for row in rows if row["variant"] == variant and row["scale"] is None), None)
        if ensemble is not None:
            ax.axhline(ensemble["accuracy"], color=line.get_color(), linestyle=":", alpha=0.8,
                       label=f"{label}: ensemble")
    for scale in evaluation.get("trained_scales", []):
        ax.axvline(scale, color="grey", alpha=0.15, linewidth=6)  # where the model was trained
    ax.set_xlabel("evaluation resolution (px); grey = trained scales")
    ax.set_ylabel("accuracy")
    ax.set_title(f"resolution sweep, {evaluation.get('split', '?')} split "
                 f"({evaluation.get('num_samples', '?')} images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


# ---------------------------------------------------------------------------------------- figures
Panel = Callable[[Any, RunFiles, dict[int, Any]], None]


def _matplotlib() -> tuple[Any, Any, Any]:
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingExtraError(feature="Plotting", extra="plot", cause=err) from None
    return Figure, FigureCanvasAgg, colormaps[COLORMAP]


def _save_figure(path: Path, panels: list[Panel], run: RunFiles, *, columns: int) -> Path:
    figure_class, canvas_class, colormap = _matplotlib()
    rows = math.ceil(len(panels) / columns)
    figure = figure_class(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained")
    canvas_class(figure)  # attaches the Agg canvas: rendering without any GUI backend
    # Colours span the training scales only: the curves must tell 64/96/128 apart; the sweep's
    # lines are per variant, not per scale.
    colors = _scale_colors(run.scales, colormap)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        panel(ax, run, colors)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(str(run.run_dir.name), fontsize="medium")
    figure.savefig(path, format="png")
    return path


def plot_run(run_dir: str | Path, *, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's figures (see the module docstring); returns their paths."""
    run = read_run(run_dir)
    target = Path(out_dir) if out_dir is not None else run.run_dir / PLOTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    figures: dict[str, tuple[list[Panel], int]] = {
        "training.png": ([draw_loss, draw_accuracy], 2),
        "schedule.png": ([draw_schedule], 1),
    }
    summary: list[Panel] = [draw_loss, draw_accuracy, draw_schedule]
    if run.evaluation is not None:
        figures["resolution.png"] = ([draw_resolution], 1)
        summary.append(draw_resolution)
    figures["summary.png"] = (summary, 2)
    try:
        written = [_save_figure(target / name, panels, run, columns=columns)
                   for name, (panels, columns) in figures.items()]
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        # Valid JSON of another shape (hand-edited, another version's run): say so, not a traceback.
        raise PlotError(f"{run.run_dir}: its metrics.jsonl, config.json or eval.json does not hold what a "
                        f"run writes ({type(err).__name__}: {err})") from None
    log.debug("wrote %s", ", ".join(str(p) for p in written))
    return written


def check_plotting_available() -> None:
    """Raise :class:`MissingExtraError` now rather than after a training run."""
    _matplotlib()
