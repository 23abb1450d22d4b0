"""benchmarks/device_session.py, the one command a short GPU loan runs: the packages it carries are enough for the
stage's imports on an interpreter without them, and a step past its time limit is stopped with everything it
started (the device would otherwise kill the whole command, and the figures with it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("device_session", ROOT / "benchmarks" / "device_session.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# run in a fresh interpreter: the packed packages' top-level names are found in the packed folder only (as on the
# device, whose image lacks them), so a package left out of the pack fails the import instead of coming from .venv
#: what the GPU machines' image lacks of sfcd's imports (its package list as read on 2026-11-17)
LACKING = ("hydra", "hydra_plugins", "omegaconf", "antlr4")
ONLY_PACKED = """
import sys
from importlib.machinery import PathFinder
DEPS, NAMES = sys.argv[1], set(sys.argv[2].split(","))
class OnlyPacked:
    def find_spec(self, name, path=None, target=None):
        if name in NAMES:
            spec = PathFinder.find_spec(name, [DEPS])
            if spec is None:
                raise ModuleNotFoundError(f"{name} is not in the packed folder", name=name)
            return spec
        return None
sys.meta_path.insert(0, OnlyPacked())
import hydra, omegaconf
import hydra_plugins.hydra_joblib_launcher
from sfcd.config import compose
cfg = compose(["experiment=test", "+sae.sweep.k=[4,8]"])
assert cfg.sae.sweep.k == [4, 8], cfg.sae.sweep
for m in (hydra, omegaconf, hydra_plugins.hydra_joblib_launcher):
    assert m.__file__.startswith(DEPS), m.__file__
print("ok")
"""


def test_the_packed_packages_are_all_the_config_needs(tmp_path):
    # catches: a package the device image lacks left out of the pack (antlr4, which omegaconf's parser imports;
    # the joblib launcher's namespace package), or the pack made where it is not looked for
    mod = load_script()
    dest = tmp_path / ".gpu-deps"
    assert mod.pack_deps(dest) == 0
    names = ",".join(LACKING)
    p = subprocess.run(
        [sys.executable, "-c", ONLY_PACKED, str(dest), names], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
    assert not list(dest.rglob("__pycache__")) and not dest.with_name(".gpu-deps.tmp").exists()


def test_a_step_past_its_limit_is_stopped_with_what_it_started(tmp_path):
    # catches: only the step's own process killed (the benchmarks' children, here a grandchild, would run on and
    # write), or the step waited for past its limit
    mod = load_script()
    mod.MIN_STEP_SECONDS = 1
    mark = tmp_path / "written"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(mark)!r}).write_text('late')"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(30)"
    with open(tmp_path / "log", "w") as log:
        t0 = time.monotonic()
        rc = mod.step(log, "sleeper", [sys.executable, "-c", parent], 1.5, env=None)
        took = time.monotonic() - t0
        assert mod.step(log, "no time", [sys.executable, "-c", "pass"], 0.5, env=None) == "skipped"
    time.sleep(4)  # the grandchild would have written by now
    assert rc == "out of time" and took < 3 and not mark.exists()
    log = (tmp_path / "log").read_text()
    assert "sleeper: out of time" in log and "no time: skipped" in log
