"""circuit.html at scale: the wall time headless Chromium takes to load, parse and draw a circuit page (its
``--dump-dom`` run), for a synthetic 19-site circuit of 300k edges with missing (NaN) values, against the same
page with 1,000 edges (the browser's own start-up, subtracted). Prints one JSON line per figure.

    python benchmarks/bench_circuit_page.py [--edges 300000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.circuits.test_page import shown, synthetic_circuit  # noqa: E402
from tests.conftest import run_chromium  # noqa: E402

from sfcd.circuits.page import render  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edges", type=int, default=300_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("needs headless Chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for n in (1_000, args.edges):
            page = Path(tmp) / f"circuit_{n}.html"
            page.write_text(render(synthetic_circuit(n), {}, {}))
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                dom = run_chromium(chromium, page.as_uri(), timeout=600)
                runs.append(time.perf_counter() - t0)
            nodes, n_edges = shown(dom)
            times[n] = statistics.median(runs)
            print(
                json.dumps(
                    {
                        "figure": "circuit.html load (chromium --dump-dom wall time, median)",
                        "edges": n,
                        "seconds": round(times[n], 2),
                        "page_mb": round(page.stat().st_size / 2**20, 1),
                        "nodes_drawn": len(nodes),
                        "edges_drawn": n_edges,
                    }
                )
            )
        print(
            json.dumps(
                {
                    "figure": "circuit.html load time beyond the browser's start-up",
                    "edges": args.edges,
                    "seconds": round(times[args.edges] - times[1_000], 2),
                }
            )
        )


if __name__ == "__main__":
    main()
