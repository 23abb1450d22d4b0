"""benchmarks/gpu_check.py, the script a GPU machine runs, passes here on the CPU in its small profile (bf16
autocast, every architecture, the mini study): catches a GPU path that only a GPU machine would find broken, and
figures it prints that do not match what it ran or wrote."""

import importlib.util
import json
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest


class Headings(HTMLParser):
    """The text of a page's h1 and h2 headings."""

    def __init__(self):
        super().__init__()
        self.h1, self.h2, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        self._in = tag if tag in ("h1", "h2") else self._in

    def handle_endtag(self, tag):
        self._in = None if tag == self._in else self._in

    def handle_data(self, data):
        if self._in:
            getattr(self, self._in).append(data.strip())


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(capsys, tmp_path):
    path = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # the small profile, smaller still: what it checks (every architecture trains its steps in bf16 on the CPU)
    # does not need 40 steps of 512 rows
    prof = mod.PROFILES["small"] = {**mod.PROFILES["small"], "steps": 12, "batch": 256, "d_sae": 128}
    t0 = time.perf_counter()
    assert mod.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["check"] for r in rows] == ["model", "sae", "sae", "sae", "sae", "study", "done"]

    saes = {r["arch"]: r for r in rows if r["check"] == "sae"}
    assert list(saes) == ["relu", "topk", "batchtopk", "jumprelu"]
    for arch, r in saes.items():
        # the profile's figures, by hand: the micro model's residual stream is 32 wide
        assert (r["precision"], r["steps"], r["d_in"], r["d_sae"]) == ("bf16-mixed", 12, 32, 128), arch
        # the metrics it prints are those the stage wrote
        m = json.loads((tmp_path / f"sae-{arch}" / "saes" / "step0" / prof["site"] / "metrics.json").read_text())
        assert (r["fve"], r["l0"]) == (round(m["fve"], 3), round(m["l0"], 1)) and m["train_tokens"] == 12 * 256
        # tokens per second over steps 2..12 (11 steps of 256 rows), timed inside the stage: at least what the
        # whole stage's wall time allows, and the stage's time within the test's
        assert r["tokens_per_s"] >= 11 * 256 / r["stage_seconds"] * 0.9, r
        assert r["stage_seconds"] <= wall
    study = next(r for r in rows if r["check"] == "study")
    run = tmp_path / "run"
    circuit = json.loads((run / "circuits" / "nounpp" / "step24" / "circuit.json").read_text())
    assert study["steps"] == [8, 24] and study["circuit_nodes"] == len(circuit["nodes"])
    assert json.loads((run / "development" / "study_steps.json").read_text())["steps"] == [8, 24]
    cc = json.loads((run / "crosscoders" / "resid.1" / "metrics.json").read_text())
    assert study["crosscoder_fve"] == cc["fve"]
    report = run / "report.html"
    assert study["report_bytes"] == report.stat().st_size
    headings = Headings()
    headings.feed(report.read_text())
    assert headings.h1 == ["sfcd study: test"]
    assert {"Circuits at step 24", "Crosscoders across checkpoints"} <= set(headings.h2)  # what the study ran
    # the total it reports covers the parts it timed, and lies within the test's own clock
    parts = rows[0]["seconds"] + sum(r["stage_seconds"] for r in saes.values()) + study["seconds"]
    assert parts - 0.3 <= rows[-1]["seconds"] <= wall + 0.1
