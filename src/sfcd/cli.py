"""``sfcd <stage> [key=value ...]``: compose the Hydra config, run the stage, print errors as one line.

``-m``/``--multirun`` sweeps go through Hydra (its launchers fan out independent jobs); ``debug=true`` or
``SFCD_DEBUG=1`` shows tracebacks of user-facing errors.
"""

from __future__ import annotations

import logging
import os
import sys

from sfcd.errors import ConfigError, SfcdError

USAGE = """usage: sfcd <stage> [group=preset ...] [key=value ...] [-m]

stages:
{stages}

examples:
  sfcd demo                                  the whole study on the embedded default (runs/demo)
  sfcd model model=1l run_dir=runs/one_layer train.steps=1000
  sfcd model -m train.seed=0,1               a Hydra sweep (one job per value)
  sfcd model --cfg job                       print the composed config
presets: model=tiny|1l|micro|pythia-70m-deduped|pythia-14m  corpus=agreement|text|hf  trainer=cpu|gpu|ddp
         experiment=demo|test"""


def _stage_help() -> str:
    from sfcd.stages import STAGES

    return "\n".join(f"  {name:<10} {fn.__doc__.strip().splitlines()[0]}" for name, fn in STAGES.items())


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _hydra_error(e: BaseException) -> str:
    """Hydra's multi-line messages (and their cause), folded into one actionable line."""
    import re

    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    text = text.split(" Config search path:")[0]
    text = text.replace("Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", "").strip()
    m = re.match(r"Could not override '([^']+)'", text)
    if m:
        return (
            f"unknown config key {m.group(1)!r}; `sfcd <stage> --cfg job` prints every key "
            f"(a new key needs a leading +)"
        )
    cause = e.__cause__ or e.__context__
    if cause is not None:
        text += ": " + str(cause).splitlines()[0]
    return text


def _validate(overrides: list[str]) -> bool:
    """Compose once up front so that config mistakes are one-line errors; returns ``debug``."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from sfcd.config import compose

    try:
        cfg = compose([o for o in overrides if not o.startswith("hydra")])
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_hydra_error(e)) from None
    return bool(cfg.debug)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-file load bars; Lightning keeps its own
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sfcd.stages import STAGES

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(stages=_stage_help()))
        return
    stage, overrides = argv[0], argv[1:]
    debug = os.environ.get("SFCD_DEBUG") == "1" or "debug=true" in overrides
    if stage not in STAGES:
        _fail(f"unknown stage {stage!r}; the stages are {sorted(STAGES)} (sfcd --help)")
    if not any(o.startswith("-") for o in overrides):  # sweeps and Hydra's flags are Hydra's to check
        try:
            debug = _validate(overrides) or debug
        except SfcdError as e:
            if debug:
                raise
            _fail(str(e))
    _run_hydra(stage, overrides, debug)


def _run_hydra(stage: str, overrides: list[str], debug: bool) -> None:
    import hydra
    from omegaconf import DictConfig

    from sfcd.config import register
    from sfcd.devices import check_accelerator
    from sfcd.stages import STAGES

    register()

    def task(cfg: DictConfig) -> None:
        logging.getLogger("sfcd").setLevel(logging.INFO)
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
        try:
            check_accelerator(cfg.trainer)  # trainer=gpu without a GPU: one line, before any stage starts
            STAGES[stage](cfg)
        except SfcdError as e:
            if debug:
                raise
            _fail(str(e))

    sys.argv = [f"sfcd {stage}", *overrides]
    hydra.main(config_path="pkg://sfcd.conf", config_name="config", version_base="1.3")(task)()


if __name__ == "__main__":
    main()
