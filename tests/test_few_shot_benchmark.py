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
