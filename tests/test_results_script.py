"""The docs/results.md generator: tables from runs, and a rewrite that keeps the hand-written text."""

from __future__ import annotations

from pathlib import Path

from multiscale_dali.benchmark.accuracy import BEGIN_MARKER, END_MARKER, format_tables, write_block


def _run(acc: float, seconds: float) -> dict:
    names = ["12px", "16px", "24px", "32px", "40px", "48px", "ensemble"]
    return {"accuracy": {n: acc for n in names}, "train_seconds": seconds}


def test_tables_report_mean_and_spread_over_seeds() -> None:
    lines = format_tables({"digits": {"single": [_run(0.5, 10), _run(0.7, 20)]}}, seeds=[0, 1])
    row = next(line for line in lines if line.startswith("| single scale"))
    # mean 60%, sample standard deviation of (50, 70) = 14.1 points, mean train time 15 s
    assert "60.0% ± 14.1" in row and row.rstrip().endswith("| 15 |")
    header = next(line for line in lines if line.startswith("| variant"))
    assert "**16px**" in header and "| 12px |" in header  # trained scales in bold, others not


def test_rewriting_keeps_commentary_outside_the_markers(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    write_block(out, ["first"])
    out.write_text("# Intro I wrote\n\n" + out.read_text().split("\n\n", 1)[1] + "\nMy conclusion.\n")
    write_block(out, ["second"])
    text = out.read_text()
    assert text.startswith("# Intro I wrote") and text.rstrip().endswith("My conclusion.")
    assert "second" in text and "first" not in text
    assert text.count(BEGIN_MARKER) == 1 and text.count(END_MARKER) == 1


def test_a_longer_variant_trains_its_multiple_of_the_dataset_epochs_and_says_so() -> None:
    from multiscale_dali.benchmark.accuracy import DATASETS, VARIANTS

    digits = DATASETS["digits"]
    assert VARIANTS["recipe-long"].epochs(digits) == 3 * digits.epochs
    assert VARIANTS["recipe"].epochs(digits) == digits.epochs
    lines = format_tables({"digits": {"recipe-long": [_run(0.9, 30)]}}, seeds=[0])
    assert any(line.startswith("| ") and f"**{3 * digits.epochs} epochs**" in line for line in lines)
