"""The demo runs end to end in its reduced size (a real `cellfuse serve` child process) and prints
a table a biologist can read."""

import re

import pytest
from rich.console import Console

from app.demo import METHODS, run_demo


@pytest.mark.slow
def test_small_demo_prints_the_results_table(tmp_path):
    console = Console(record=True, width=200, force_terminal=False)
    code = run_demo(small=True, data_dir=tmp_path / "demo", console=console)
    text = console.export_text()
    assert code == 0, text
    for method in METHODS:
        assert re.search(rf"^\W*{method}\W", text, flags=re.M), (method, text)
    assert "Nuclei: held-out test fields by method" in text and "Cells: held-out test fields" in text
    assert "flow_fusion, chosen set" in text
    assert "chosen channel set for nuclei:" in text and "chosen channel set for cells:" in text
    assert "Flow Fusion by channel subset, nuclei" in text
    # The Flow Fusion rows carry five scores in [0, 1] (F1, precision, recall, Jaccard, mAP).
    ff_rows = [line for line in text.splitlines() if re.match(r"^\W*flow_fusion\W", line)]
    assert len(ff_rows) >= 4, text  # two objects x (all channels, chosen set)
    for line in ff_rows:
        scores = [float(x) for x in re.findall(r"\b[01]\.\d{3}\b", line)]
        assert len(scores) == 5 and all(0.0 <= x <= 1.0 for x in scores), line
    assert "web page: http://127.0.0.1:" in text
    assert re.search(r"demo finished in \d+ s", text)
    jobs_dir = tmp_path / "demo" / "jobs"
    assert any(p.name == "overlay.png" for p in jobs_dir.rglob("*.png"))
    assert any(p.name == "measurements.csv" for p in jobs_dir.rglob("*.csv"))
