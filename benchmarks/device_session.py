"""Issue 21's GPU checks in one command, for a short loan of one GPU machine (the project's device sessions: about
15 minutes of device time in all, start-up included, one command at most 10 minutes, at most 8 files back, each
under 16 MiB; the machine's image has torch, lightning and transformers but not hydra or omegaconf).

Here, once (the pure-Python packages the device image lacks, copied from this checkout's .venv into
``.gpu-deps/``, which git ignores; about 4 MB)::

    .venv/bin/python benchmarks/device_session.py --pack-deps

There, as the device tool's one ``run`` (``carry=[".gpu-deps"]``, ``timeout_s=600``)::

    python3 benchmarks/device_session.py --out "$OUT"

A dry run of the same plumbing here (the benchmarks' small CPU profiles)::

    .venv/bin/python benchmarks/device_session.py --device cpu --out /tmp/device_session

In order, each step in its own process with its own time limit, inside one budget (``--budget``, 540 s: the
command's 600 less a margin), a step that does not fit in what is left skipped and said so:

1. the versions (torch, CUDA, the GPU, lightning, transformers) into ``session.log``;
2. ``benchmarks/gpu_speed.py`` (the issue's figures: one SAE per architecture at d_sae 32,768, TopK with dead
   latents, the 19 sites from one stream, the harvest, the host's floor; under 5 minutes on an H100/H200), with
   ``--compile`` only when asked (minutes more);
3. the tests that run only on a GPU (``-k gpu`` in :data:`GPU_TESTS`: the prefetching stream on its CUDA stream,
   the chunk permutation's copy and AuxK's dead sets with the host syncs they should make);
4. ``benchmarks/gpu_check.py`` (every architecture through the stage in bf16, then a two-checkpoint mini study),
   when at least ``--check-seconds`` are left.

Left out: ``pythia_rehearsal.py --gpu`` (one checkpoint at the preset's 50M tokens: 10 minutes or more at the
issue's target, a loan of its own).

Back in ``--out`` (8 files at most): ``session.log`` (every step's output, its exit code and seconds),
``figures.jsonl`` (gpu_speed's figures), ``top_kernels.txt`` (gpu_speed's kernel tables, one after the other) and
``trace_topk.json.gz``, ``trace_topk_dead.json.gz`` (AuxK's dead-set read), ``trace_all_sites.json.gz`` where
they fit. Exit status: 0 when every step that ran passed in time (a skipped step is said in the log: gpu_check
is, when gpu_speed took most of the budget).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPS = ROOT / ".gpu-deps"
#: what the device image lacks, as (import name, distribution-info prefix) in this checkout's .venv
PACKAGES = (
    ("hydra", "hydra_core-"),
    ("hydra_plugins", "hydra_joblib_launcher-"),
    ("omegaconf", "omegaconf-"),
    ("antlr4", "antlr4_python3_runtime-"),
)
#: the test files that hold tests needing a GPU (``-k gpu`` selects those)
GPU_TESTS = ("tests/activations/test_stream.py", "tests/sae/test_host_syncs.py")
#: a step with less time than this left is skipped
MIN_STEP_SECONDS = 10
#: a file back from the device is at most 16 MiB
MAX_BACK = 15 << 20
VERSIONS = (
    "import torch, lightning, transformers\n"
    "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__,"
    " 'transformers', transformers.__version__)\n"
    "print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU visible')\n"
)


def pack_deps(dest: Path = DEPS) -> int:
    """Copy :data:`PACKAGES` (and their dist-info, which ``importlib.metadata`` reads) from this interpreter's
    site-packages into ``dest``, without bytecode."""
    site = Path(sysconfig.get_paths()["purelib"])
    missing = [name for name, _ in PACKAGES if not (site / name).is_dir()]
    if missing:
        print(f"device_session: {missing} not in {site}; run `make setup` first", file=sys.stderr)
        return 2
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, info in PACKAGES:
        shutil.copytree(site / name, tmp / name, ignore=skip)
        for d in site.glob(f"{info}*.dist-info"):
            shutil.copytree(d, tmp / d.name, ignore=skip)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"device_session: {len(PACKAGES)} packages in {dest} ({size / 1e6:.1f} MB); carry it: carry=['.gpu-deps']")
    return 0


def step(log, title: str, argv: list[str], seconds: float, env: dict) -> int | str:
    """Run ``argv`` in its own process group for at most ``seconds``, its output appended to ``log``: its exit code,
    ``"out of time"`` (the whole group killed, as the device kills a command past its limit), or ``"skipped"``
    where less than :data:`MIN_STEP_SECONDS` are left."""
    if seconds < MIN_STEP_SECONDS:
        log.write(f"\n===== {title}: skipped, {seconds:.0f} s left\n")
        return "skipped"
    log.write(f"\n===== {title}: {' '.join(argv)} (limit {seconds:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        rc = "out of time"
    with contextlib.suppress(ProcessLookupError):  # also what it left running when it ended in time
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    log.write(f"===== {title}: {rc if isinstance(rc, str) else f'exit {rc}'} after {time.monotonic() - t0:.0f} s\n")
    log.flush()
    return rc


def bring_back(src: Path, out: Path, name: str, log, compress: bool = False) -> None:
    """``src`` into ``out/name`` (gzipped with ``compress``) if it exists and fits what comes back."""
    if not src.is_file():
        log.write(f"(not written: {src.name})\n")
        return
    dest = out / name
    if compress:
        with open(src, "rb") as f, gzip.open(dest, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
    else:
        shutil.copyfile(src, dest)
    if dest.stat().st_size > MAX_BACK:
        dest.unlink()
        log.write(f"(left out: {name}, over {MAX_BACK >> 20} MiB)\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack-deps", action="store_true", help="here: copy hydra and omegaconf into .gpu-deps/ and stop")
    ap.add_argument("--out", default=os.environ.get("OUT", "device_session_out"), help="what comes back (default $OUT)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the plumbing here")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all the steps (default: %(default)s)")
    ap.add_argument("--check-seconds", type=float, default=200.0, help="gpu_check runs when this much is left")
    ap.add_argument("--compile", action="store_true", help="gpu_speed's compiled rows too (minutes more)")
    args = ap.parse_args(argv)
    if args.pack_deps:
        return pack_deps()
    deadline = time.monotonic() + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sfcd-device-session-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    # this checkout's sources (not installed there) and the packed packages, ahead of anything else
    paths = [str(ROOT / "src"), *([str(DEPS)] if DEPS.is_dir() else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    py, dev = sys.executable, ["--device", args.device]
    codes: dict[str, int | str] = {}
    with open(out / "session.log", "w") as log:
        if args.device == "cuda" and not DEPS.is_dir():
            log.write(f"note: no {DEPS.name}/ here; hydra and omegaconf must be installed (see --pack-deps)\n")

        def left() -> float:
            return deadline - time.monotonic()

        codes["versions"] = step(log, "versions", [py, "-c", VERSIONS], min(60, left()), env)
        speed = work / "speed"
        flags = ["--compile"] if args.compile else []
        cmd = [py, "benchmarks/gpu_speed.py", *dev, "--out", str(speed), *flags]
        codes["gpu_speed"] = step(log, "gpu_speed", cmd, max(1, left() - 90), env)  # 90 s kept for the tests
        bring_back(speed / "figures.jsonl", out, "figures.jsonl", log)
        tables = sorted(speed.glob("top_kernels_*.txt"))
        if tables:
            (out / "top_kernels.txt").write_text("".join(f"===== {t.name}\n{t.read_text()}\n" for t in tables))
        for name in ("topk", "topk_dead", "all_sites"):
            bring_back(speed / f"trace_{name}.json", out, f"trace_{name}.json.gz", log, compress=True)
        tests = ["-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-k", "gpu", *GPU_TESTS]
        codes["gpu_tests"] = step(log, "gpu tests", [py, *tests], left(), env)
        if left() >= args.check_seconds:
            codes["gpu_check"] = step(log, "gpu_check", [py, "benchmarks/gpu_check.py", *dev], left(), env)
        else:
            log.write(f"\n===== gpu_check: skipped, {left():.0f} s left, it needs {args.check_seconds:.0f}\n")
            codes["gpu_check"] = "skipped"
        log.write(f"\n===== exit codes: {codes}\n")
    shutil.rmtree(work, ignore_errors=True)
    print((out / "session.log").read_text()[-6000:])
    return 0 if all(rc in (0, "skipped") for rc in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
