"""benchmarks/gpu_check.py, the script a GPU machine runs, passes here on the CPU in its small profile (bf16
autocast, every architecture, the mini study): catches a GPU path that only a GPU machine would find broken."""

import importlib.util
import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(capsys, tmp_path):
    path = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    saes = {r["arch"]: r for r in rows if r["check"] == "sae"}
    assert set(saes) == {"relu", "topk", "batchtopk", "jumprelu"}
    assert all(r["precision"] == "bf16-mixed" and r["steps"] == 40 and r["tokens_per_s"] > 0 for r in saes.values())
    study = next(r for r in rows if r["check"] == "study")
    assert study["report_bytes"] > 0 and rows[-1]["check"] == "done"
    assert (tmp_path / "run" / "report.html").exists()
