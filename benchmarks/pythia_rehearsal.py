"""The real target, rehearsed offline: pythia-70m-deduped's architecture and storage, run through the whole study.

A stand-in of Pythia's checkpoints: a series of GPT-NeoX checkpoints with pythia-70m-deduped's exact architecture
(6 layers, d_model 512, 8 heads, d_mlp 2048, rotary_pct 0.25, parallel residual, untied, vocab 50,304), each
trained a few more steps on the built-in agreement corpus (its tokenizer, padded to the vocab), stored as the
hub stores Pythia (float16 safetensors, config dtype float16, the tokenizer beside it) in ``series/step<N>/``:
``model.source=<series>`` reads them by step, as the pythia preset reads revisions ``step<N>`` from the hub.

Then the pythia preset's study runs on them, stage by stage, each stage its own process (``sfcd <stage>``, as
one would fan them out with Hydra): 19 sites x 32,768-feature TopK SAEs at every checkpoint, the dashboards,
the four agreement circuits (simple, nounpp, rc, within_rc) with 100 pairs at every checkpoint, crosscoders over
the checkpoints at the six resid sites, then ``sfcd study`` (the seed baseline, the development analysis and
report.html; everything else is found complete). Token budgets are small enough for this CPU; every shape is
the real one (19 sites, 32,768 features, vocab 50,304, 100 pairs, K checkpoints); ``--quick`` finds the circuits'
node effects by attribution (one backward pass) and sweeps 4 thresholds, where the preset uses IG and 15.
Per stage it prints one JSON line: wall time, peak RSS (of that process alone), bytes written
to the run directory, and the error if it failed; then the report's size and, where Chromium is installed, the
time it takes to load.

    python benchmarks/pythia_rehearsal.py --quick            # about an hour on 2 cores: the real shapes' arithmetic
    python benchmarks/pythia_rehearsal.py                    # larger CPU budgets
    python benchmarks/pythia_rehearsal.py --gpu              # on a GPU: one checkpoint at the preset's real
                                                             # budget (50M tokens), tokens/s and peak GPU memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ["simple", "nounpp", "rc", "within_rc"]
PYTHIA_VOCAB = 50304

#: token budgets per profile (every shape is the preset's: 19 sites, d_sae 32,768, 100 pairs, K checkpoints)
PROFILES = {
    "quick": {
        "series": [0, 4, 12],  # checkpoint steps (optimizer steps of the stand-in's training)
        "corpus": ["corpus.n_tokens=400000", "corpus.val_tokens=60000", "corpus.task_pairs=400"],
        # two optimizer steps of 1,024 tokens per checkpoint: the cost is the shapes (19 x 512 x 32,768), not tokens
        "sae": [
            "sae.n_tokens=2048",
            "sae.batch_size=1024",
            "sae.buffer_tokens=2048",
            "sae.eval_tokens=2048",
            "sae.ce_tokens=512",
            "sae.harvest_batch=16",
            "sae.checkpoint_every=0",
        ],
        "features": ["features.n_tokens=2048"],
        "circuit": ["circuit.n_examples=100", "circuit.method=attrib", "circuit.sweep_points=4"],
        "crosscoder": [
            "crosscoder.n_tokens=2048",
            "crosscoder.batch_size=1024",
            "crosscoder.buffer_tokens=2048",
            "crosscoder.eval_tokens=2048",
            "crosscoder.ce_tokens=512",
        ],
    },
    "cpu": {
        "series": [0, 16, 48, 96],
        "corpus": ["corpus.n_tokens=1000000", "corpus.val_tokens=100000", "corpus.task_pairs=400"],
        "sae": [
            "sae.n_tokens=65536",
            "sae.buffer_tokens=32768",
            "sae.eval_tokens=16384",
            "sae.ce_tokens=4096",
            "sae.harvest_batch=16",
        ],
        "features": ["features.n_tokens=16384"],
        "circuit": ["circuit.n_examples=100"],
        "crosscoder": [
            "crosscoder.n_tokens=32768",
            "crosscoder.buffer_tokens=16384",
            "crosscoder.eval_tokens=8192",
            "crosscoder.ce_tokens=2048",
        ],
    },
}


def make_series(root: Path, scratch: Path, steps: list[int], corpus: list[str], seed: int = 0) -> None:
    """The stand-in's checkpoints: pythia-70m-deduped's architecture, AdamW on a scratch agreement corpus (whose
    tokenizer becomes "Pythia's"), saved in float16."""
    import numpy as np
    import torch
    from transformers import GPTNeoXForCausalLM

    from sfcd.config import compose
    from sfcd.data.corpus import build_corpus, corpus_tokenizer
    from sfcd.data.tokens import read_tokens
    from sfcd.models.presets import neox_config

    r = build_corpus(compose(["experiment=test", "corpus=agreement", f"run_dir={scratch}", *corpus]))
    tok = corpus_tokenizer(r)
    preset = compose(["model=pythia-70m-deduped"]).model
    torch.manual_seed(seed)
    net = GPTNeoXForCausalLM(neox_config(preset, PYTHIA_VOCAB, tok.bos_token_id or 0, tok.eos_token_id or 0))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = read_tokens(r.tokens("train"))
    rng = np.random.default_rng(seed)
    seq, batch, done = 128, 4, 0
    for target in steps:
        while done < target:
            starts = rng.integers(0, len(tokens) - seq - 1, batch)
            x = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq + 1], dtype=np.int64) for s in starts]))
            loss = net(x[:, :-1], labels=x[:, :-1]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
        out = root / f"step{target}"
        if not (out / "config.json").exists():
            tmp = root / f".tmp-step{target}"
            shutil.rmtree(tmp, ignore_errors=True)
            copy = GPTNeoXForCausalLM(net.config)
            copy.load_state_dict(net.state_dict())
            copy.half().save_pretrained(tmp)  # float16 safetensors, config "dtype": "float16", as on the hub
            tok.save_pretrained(tmp)
            tmp.rename(out)
        print(json.dumps({"series_step": target, "loss": round(float(loss), 3) if done else None}), flush=True)


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def stage(name: str, cmd: list[str], run: Path, log_dir: Path) -> dict:
    """Run one stage in its own process; its wall time, its own peak RSS (wait4), the bytes it added."""
    before = folder_bytes(run)
    log = log_dir / f"{name.replace('/', '_').replace(' ', '_')}.log"
    t = time.perf_counter()
    with open(log, "w") as out, GpuMemory() as gpu:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(p.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    row = {
        "stage": name,
        "ok": rc == 0,
        "seconds": round(time.perf_counter() - t, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
        "bytes_written": folder_bytes(run) - before,
    }
    if gpu.peak is not None:
        row["peak_gpu_gib"] = round(gpu.peak / 2**30, 2)
    if rc:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        row["error"] = next((x for x in reversed(lines) if x.startswith("error:")), (lines or ["?"])[-1])[:400]
        row["log"] = str(log)
    print(json.dumps(row), flush=True)
    return row


class GpuMemory:
    """Peak GPU memory in use while a stage runs, sampled from nvidia-smi every half second (the stage is another
    process, so its own torch counters are out of reach); None where there is no nvidia-smi."""

    def __init__(self):
        import threading

        self.peak, self.exe = None, shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    [self.exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                used = max(int(x) for x in out.split()) * 2**20
                self.peak = max(self.peak or 0, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __enter__(self):
        if self.exe:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def chromium_load_seconds(page: Path) -> float | None:
    """Seconds headless Chromium takes to load ``page`` and dump its DOM (None without Chromium)."""
    from bench_dashboard import chromium_run  # this folder's: one way to start the browser

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    return round(chromium_run(exe, page.as_uri())[0], 2) if exe else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the smallest token budgets, every shape real")
    ap.add_argument("--gpu", action="store_true", help="one checkpoint at the preset's real budget on a GPU")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--make-series", nargs="+", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--series", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_series:
        make_series(Path(args.series), Path(args.scratch), args.make_series, args.corpus)
        return

    prof = PROFILES["quick" if args.quick or args.gpu else "cpu"]
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sfcd-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    run, series, logs = work / "run", work / "series", work / "logs"
    series.mkdir(exist_ok=True)
    logs.mkdir(exist_ok=True)
    sfcd = [str(Path(sys.executable).parent / "sfcd")]
    steps = prof["series"][-1:] if args.gpu else prof["series"]
    trainer = ["trainer=gpu"] if args.gpu else ["trainer=cpu"]
    base = ["experiment=pythia", "corpus=agreement", f"run_dir={run}", f"model.source={series}", *trainer]
    base += [f"study.steps=[{','.join(map(str, steps))}]", f"study.tasks=[{','.join(TASKS)}]", "study.crosscoder=true"]
    if args.gpu:  # the preset's own SAE budget (50M tokens, 2^18-token chunks, 1M evaluation tokens): a corpus
        # whose held-out split holds those evaluation tokens, and 5M training tokens (50M are 10 passes over them)
        corpus = ["corpus.n_tokens=5000000", "corpus.val_tokens=1200000", "corpus.task_pairs=400"]
        prof = {
            **prof,
            "corpus": corpus,
            "sae": ["sae.checkpoint_every=0"],
            "features": [],
            "circuit": [],
            "crosscoder": [],
        }
    common = base + prof["sae"] + prof["features"] + prof["circuit"] + prof["crosscoder"]
    make = [sys.executable, __file__, "--scratch", str(work / "scratch"), "--series", str(series)]
    make += ["--make-series", *map(str, prof["series"]), "--corpus", *prof["corpus"]]
    rows = [stage("checkpoints (float16 series)", make, series, logs)]
    # the study's corpus, tokenized with the checkpoints' own tokenizer (as the preset tokenizes with Pythia's)
    rows.append(stage("corpus", [*sfcd, "corpus", *base, *prof["corpus"]], run, logs))
    if not all(r["ok"] for r in rows):
        sys.exit(f"the stand-in could not be built: {rows}")
    for st in steps:
        # the study's own seed for each checkpoint's SAEs (sae.seed + step), so that it finds them complete
        rows.append(stage(f"sae step{st}", [*sfcd, "sae", *common, f"step={st}", f"sae.seed={st}"], run, logs))
    if args.gpu:  # the preset's budget per checkpoint: its tokens over the stage's whole wall time (harvest, eval)
        from sfcd.config import compose

        n = compose(["experiment=pythia"]).sae.n_tokens
        for r in rows:
            if r["stage"].startswith("sae") and r["ok"]:
                print(
                    json.dumps(
                        {
                            "figure": "gpu_sae_stage_tokens_per_s",
                            "sites": 19,
                            "d_sae": 32768,
                            "n_tokens": n,
                            "value": round(n / r["seconds"]),
                            "peak_gpu_gib": r.get("peak_gpu_gib"),
                        }
                    ),
                    flush=True,
                )
    rows.append(stage(f"features step{steps[-1]}", [*sfcd, "features", *common, f"step={steps[-1]}"], run, logs))
    for page in sorted((run / "features" / f"step{steps[-1]}").glob("*/index.html"))[:1]:  # a 32k-feature dashboard
        print(
            json.dumps(
                {
                    "figure": "dashboard",
                    "page": str(page.relative_to(run)),
                    "bytes": page.stat().st_size,
                    "chromium_load_s": chromium_load_seconds(page),
                }
            ),
            flush=True,
        )
    for st in steps if not args.gpu else []:
        for task in TASKS:
            extra = [f"circuit.task={task}", f"circuit.baselines={str(st == steps[-1]).lower()}"]
            rows.append(stage(f"circuit {task} step{st}", [*sfcd, "circuit", *common, f"step={st}", *extra], run, logs))
    if not args.gpu:
        rows.append(stage("crosscoder resid x K", [*sfcd, "crosscoder", *common], run, logs))
        rows.append(stage("study (seed baseline, development, report)", [*sfcd, "study", *common], run, logs))
        page = run / "report.html"
        if page.exists():
            print(
                json.dumps(
                    {"figure": "report", "bytes": page.stat().st_size, "chromium_load_s": chromium_load_seconds(page)}
                ),
                flush=True,
            )
    failed = [r["stage"] for r in rows if not r["ok"]]
    total = {
        "figure": "rehearsal",
        "profile": "gpu" if args.gpu else "quick" if args.quick else "cpu",
        "stages": len(rows),
        "failed": failed,
        "seconds": round(sum(r["seconds"] for r in rows), 1),
        "max_peak_rss_gib": max(r["peak_rss_gib"] for r in rows),
        "bytes_written": folder_bytes(run),
        "work": str(work),
    }
    print(json.dumps(total), flush=True)
    if not args.out and not failed:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
