"""report.html at the real target's shape: a fabricated study of pythia-70m-deduped's 19 sites x K checkpoints
(4 tasks' circuits, crosscoders at the 6 resid sites; tests/report/synthetic.py), then the report as the study
writes it. One JSON line per K: time to make the plots (as run_study does) and to render, the page's size, how
much of it is embedded PNG, and the number of images, per-site sections and table cells."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.report.synthetic

from tests.report.synthetic import fabricate  # noqa: E402

from sfcd.report.html import render  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, nargs="+", default=[10, 20])
    p.add_argument(
        "--keep", type=Path, default=None, help="write the runs here (to look at them) instead of a temp dir"
    )
    a = p.parse_args()
    for k in a.k:
        with tempfile.TemporaryDirectory() as tmp:
            root = (a.keep or Path(tmp)) / f"k{k}"
            t0 = time.perf_counter()
            dev, plots, links = fabricate(root, k=k)
            t1 = time.perf_counter()
            page = render(root, "sfcd study: pythia-70m-deduped (fabricated)", plots, dev, links)
            t2 = time.perf_counter()
            text = page.read_text()
            pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
            print(
                json.dumps(
                    {
                        "figure": "report_19_sites",
                        "sites": len(dev["sites"]),
                        "k": len(dev["steps"]),
                        "plots_and_fabrication_s": round(t1 - t0, 2),
                        "render_s": round(t2 - t1, 3),
                        "report_bytes": len(text.encode()),
                        "embedded_png_bytes": sum(len(x) for x in pngs),
                        "images": len(pngs),
                        "details": text.count("<details"),
                        "table_cells": text.count("<td"),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
