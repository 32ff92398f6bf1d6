"""`cellfuse bench few-shot --small`: every line runs on both datasets and the table prints."""

from __future__ import annotations

import math

import pytest


@pytest.mark.slow
def test_few_shot_benchmark_small_runs_every_line_on_both_datasets():
    from app.benchmarks.few_shot import FewShotBudget, run_few_shot_benchmark

    lines: list[str] = []
    out = run_few_shot_benchmark(small=True, echo=lines.append)
    budget = FewShotBudget.small()
    for name in ("synthetic", "dsb2018"):
        rows = out["results"][name]["rows"]
        assert {"classical", "cellcutter (stain)", "shipped base", "self-trained"} <= set(rows)
        for line in ("random", "shipped base", "ISL init", "ISL from base", "self-trained"):
            assert set(rows[line]) >= set(budget.counts) - {0}, line
        for by_n in rows.values():
            for values in by_n.values():
                assert len(values) == len(budget.seeds)
                assert all(math.isnan(f1) or 0.0 <= f1 <= 1.0 for f1, _ in values)
        isl = out["results"][name]["isl"]
        assert isl["base"]["epochs"] >= 1 and math.isfinite(isl["base"]["best_val_l1"])
    assert sum(line.startswith("| classical |") for line in lines) == 2


def test_few_shot_command_passes_seeds_and_sizes_to_the_benchmark(monkeypatch):
    """The README's DSB2018 budget (10 test crops, 10 pretext images, chosen seeds) is one command."""
    from typer.testing import CliRunner

    from app.benchmarks import few_shot
    from app.cli import cli

    seen: dict = {}
    monkeypatch.setattr(few_shot, "run_few_shot_benchmark", lambda **kwargs: seen.update(kwargs))
    args = ["bench", "few-shot", "--dataset", "dsb2018", "--seed", "0", "--seed", "2", "--n-test", "10"]
    result = CliRunner().invoke(cli, [*args, "--n-pretext", "10"])
    assert result.exit_code == 0, result.output
    budget = seen["budget"]
    assert seen["datasets"] == ("dsb2018",)
    assert (budget.seeds, budget.n_test, budget.n_pretext, budget.steps) == (
        (0, 2),
        10,
        10,
        few_shot.FewShotBudget.steps,
    )
    result = CliRunner().invoke(cli, ["bench", "few-shot", "--small"])
    assert result.exit_code == 0 and seen["budget"] == few_shot.FewShotBudget.small()
    assert seen["datasets"] == ("synthetic", "dsb2018")
