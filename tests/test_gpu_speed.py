"""benchmarks/gpu_speed.py, the speed figures a GPU machine measures before and after speed changes, runs here on the
CPU in its small profile: every figure is there and is what its own printed parts make it (the floor recomputed
here from the shapes, the parameter count and the measured rates), the profiler wrote its traces and tables, and
the all-sites run trained and wrote one SAE per site of the model."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

ARCHS = ["relu", "jumprelu", "topk", "batchtopk"]


def load_script():
    path = Path(__file__).parents[1] / "benchmarks" / "gpu_speed.py"
    spec = importlib.util.spec_from_file_location("gpu_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def close(a: float, b: float, rel: float = 2e-3) -> bool:
    """Equal up to the script's rounding of printed times and rates (4 significant figures)."""
    return math.isclose(a, b, rel_tol=rel)


def check_floor(r: dict, shapes: list[tuple[int, int]], n_params: int) -> None:
    """The floor's parts are the shapes' and the parameters', and floor and fraction follow from the parts."""
    b = r["batch"]
    assert r["encoder_flops_per_step"] == sum(2 * b * d_in * d_sae for d_in, d_sae in shapes), r
    assert r["n_params"] == n_params, r
    assert r["optimizer_bytes_per_step"] == 7 * 4 * n_params, r  # Adam: 4 float32 reads + 3 writes a parameter
    flops, bandwidth = r["matmul_bf16_flops_per_s"], r["copy_bandwidth_bytes_per_s"]
    assert 0 < flops < math.inf and 0 < bandwidth < math.inf, r
    floor_s = r["encoder_flops_per_step"] / flops + r["optimizer_bytes_per_step"] / bandwidth
    assert close(r["encoder_ms"], r["encoder_flops_per_step"] / flops * 1e3), r
    assert close(r["optimizer_ms"], r["optimizer_bytes_per_step"] / bandwidth * 1e3), r
    assert close(r["floor_ms_per_step"], floor_s * 1e3), r
    assert close(r["floor_tokens_per_s"], b / floor_s), r
    assert close(r["fraction_of_floor"], r["tokens_per_s"] / (b / floor_s)), r


@pytest.mark.slow
def test_gpu_speed_small_profile_on_the_cpu(capsys, tmp_path):
    mod = load_script()
    out, work = tmp_path / "out", tmp_path / "work"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the suite's workers run: two threads on two busy cores make tiny ops ~10x slower
    try:
        t0 = time.perf_counter()
        assert mod.main(["--device", "cpu", "--profile", "small", "--out", str(out), "--work", str(work)]) == 0
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    written = [json.loads(x) for x in (out / "figures.jsonl").read_text().splitlines()]
    assert printed == written
    assert [r["figure"] for r in printed] == ["sae_step"] * 5 + [
        "all_sites_stream",
        "all_sites_stream_no_prefetch",
        "harvest_dtypes",
        "host_ms_per_step_sites19",
    ]
    prof = mod.PROFILES["small"]

    archs = {r["architecture"]: r for r in printed[:4]}
    assert list(archs) == ARCHS and all(r["dead_latents"] == 0 for r in printed[:4])
    dead = printed[4]  # TopK again, an eighth of its latents dead at every step: AuxK on
    assert (dead["architecture"], dead["dead_latents"], dead["d_sae"]) == ("topk", prof["d_sae"] // 8, prof["d_sae"])
    assert 0 < dead["tokens_per_s"] < math.inf and dead["steps"] == archs["topk"]["steps"], dead
    for arch, r in archs.items():
        d_in, d_sae, b = r["d_in"], r["d_sae"], r["batch"]
        assert (d_in, d_sae, b, r["n_saes"]) == (prof["d_in"], prof["d_sae"], prof["batch"], 1)
        assert r["precision"] == "bf16-mixed"
        assert r["k"] == (32 if "topk" in arch else None)  # the pythia preset's k
        assert r["warmup_steps"] == prof["warmup"] and r["timed_steps"] == prof["timed"]
        assert 0 < r["tokens_per_s"] < math.inf, r
        assert close(r["tokens_per_s"], b / (r["loop_ms_per_step"] / 1e3)), r
        # the loop's time a step holds the step's own (start to end of the batch) and the time between steps
        assert r["step_ms_median"] > 0 and r["loop_ms_per_step"] >= 0.99 * r["step_ms_mean"] > 0, r
        assert r["timed_steps"] * r["loop_ms_per_step"] / 1e3 <= wall, r
        # W_enc, W_dec, b_enc, b_dec (JumpReLU: and its per-latent threshold)
        n_params = 2 * d_in * d_sae + d_sae + d_in + (d_sae if arch == "jumprelu" else 0)
        check_floor(r, [(d_in, d_sae)], n_params)
        assert r["peak_memory_gib"] is None and r["meets_target"] is None  # CPU: no CUDA memory; small: no target
    assert archs["topk"]["target_tokens_per_s"] == 1.5e6 and archs["topk"]["steps"] == sum(
        (prof["warmup"], prof["timed"], *prof["profile_steps"], prof["sync_steps"], 1)
    )
    assert all(r["host_syncs_per_step"] is None for r in printed[:7])  # counted on a GPU only

    for s in printed[5:7]:
        # the micro model's sites: embed, and attn/mlp/resid of each of its 2 layers
        names = ["embed", *(f"{kind}.{layer}" for layer in range(2) for kind in ("attn", "mlp", "resid"))]
        assert s["sites"] == s["n_saes"] == len(names) == 7 and s["site_names"] == names
        run = "all_sites" if s["prefetch"] else "all_sites_no_prefetch"
        saes = sorted((work / run / "saes" / "step0").glob("*/metrics.json"))
        assert sorted(p.parent.name for p in saes) == sorted(names)
        for p in saes:
            m = json.loads(p.read_text())
            assert (m["architecture"], m["d_in"], m["d_sae"], m["hparams"]["k"]) == ("topk", 32, prof["d_sae"], 32)
            assert m["train_tokens"] == s["steps"] * s["batch"] and m["training"]["buffer_tokens"] == 3 * s["batch"]
        assert s["harvest_autocast"] is None  # auto on the CPU: the model's own float32
        assert s["harvests_timed"] >= 1 and s["harvest_ms_per_chunk"] > 0
        assert s["steps_per_chunk"] == prof["chunk_steps"]
        if s["prefetch"]:  # the harvests ran beside the steps: the loop's whole time a step
            stream_ms = s["window_ms_per_step"]
            assert s["loop_ms_per_step"] == s["window_ms_per_step"], s
        else:  # the loop's time a step and each chunk's harvest shared by its steps
            stream_ms = s["loop_ms_per_step"] + s["harvest_ms_per_chunk"] / s["steps_per_chunk"]
        assert 0 < s["tokens_per_s"] < math.inf and close(s["tokens_per_s"], s["batch"] / (stream_ms / 1e3)), s
        assert close(s["training_tokens_per_s"], s["batch"] / (s["loop_ms_per_step"] / 1e3)), s
        assert close(s["projected_minutes_per_checkpoint"], 50e6 / s["tokens_per_s"] / 60), s
        assert s["target_tokens_per_s"] == 85e3
        check_floor(s, [(32, prof["d_sae"])] * 7, 7 * (2 * 32 * prof["d_sae"] + prof["d_sae"] + 32))
    assert [s["prefetch"] for s in printed[5:7]] == [True, False]

    h = printed[7]
    assert h["sites"] == 7 and h["tokens"] == prof["harvest_windows"] * h["seq_len"] and h["seq_len"] > 0
    for dtype in ("bfloat16", "float16"):
        assert close(h[f"{dtype}_speedup"], h[f"{dtype}_tokens_per_s"] / h["float32_tokens_per_s"], 3e-3), h
        # autocast ran (its activations are not float32's) and stayed near them (8 or 11 bits of mantissa)
        assert 1e-5 < h[f"{dtype}_worst_site_rel_error"] < 0.05, h

    host = printed[8]  # 19 SAEs on the trainer's device and precision; one logging step in ten weighed in
    assert (host["device"], host["precision"]) == ("cpu", "bf16-mixed")
    # times in either order (a logging step's extra work is small beside this machine's noise); its extra calls not
    assert host["step_ms"] > 0 and host["logging_step_ms"] > 0, host
    assert close(host["value"], 0.9 * host["step_ms"] + 0.1 * host["logging_step_ms"], 1e-2), host
    assert close(host["per_sae_ms"], host["value"] / 19, 1e-2), host
    assert 0 < host["python_calls_step"] < host["python_calls_logging_step"], host

    ops = {}
    for name in ("topk", "topk_dead", "all_sites"):
        trace = json.loads((out / f"trace_{name}.json").read_text())
        assert len(trace["traceEvents"]) > 10, name
        ops[name] = {e.get("name") for e in trace["traceEvents"]}
        table = (out / f"top_kernels_{name}.txt").read_text()
        assert "Self CPU" in table and len(table.splitlines()) > 10, name
    # the profiled steps read the dead set and take AuxK's dead columns only where latents were dead: the dead
    # count reached that run, and no other
    for op in ("aten::nonzero_static", "aten::index_select"):
        assert op in ops["topk_dead"] and op not in ops["topk"], op


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_speed_asks_for_a_gpu_clearly(capsys, tmp_path):
    assert load_script().main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "asks for a GPU but torch sees none" in err and "Traceback" not in err


def test_host_syncs_are_counted_per_step_by_place():
    # catches: counting every warning (not only CUDA's sync warnings), a count not divided by the counted steps,
    # places merged or lost. The records are what warnings.catch_warnings gives for CUDA's sync debug mode (it
    # needs a GPU to make them)
    import warnings

    mod = load_script()
    timer = mod.StepTimer(torch.device("cuda"), 1, 1, sync_from=2, sync_steps=2)

    def record(message, filename, lineno):
        return warnings.WarningMessage(UserWarning(message), UserWarning, filename, lineno)

    sync = "called a synchronizing CUDA operation"
    timer.sync_records = [
        *[record(sync, "/x/sfcd/sae/topk.py", 86)] * 3,
        record(sync, "/x/sfcd/sae/train.py", 351),
        record("some other warning", "/x/a.py", 1),
    ]
    got = timer.sync_counts()
    assert got == {"host_syncs_per_step": 2.0, "sync_sites": {"topk.py:86": 3, "train.py:351": 1}}
    assert mod.StepTimer(torch.device("cpu"), 1, 1, sync_steps=2).sync_counts()["host_syncs_per_step"] is None


def test_host_syncs_are_counted_over_whole_steps(monkeypatch):
    # catches: the count closed at the last counted step's batch end, before the progress bar and the loop's own
    # work after it (the bar read the logged values at every step: a sync a step that the count did not see), or
    # opened late or closed early. The sync warnings are made here, at the hooks' places (the mode needs a GPU)
    import warnings

    mod = load_script()
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    timer = mod.StepTimer(torch.device("cuda"), 1, 1, sync_from=2, sync_steps=2)
    timer.clock = mod.Clock(False)

    def sync(where):
        warnings.warn(f"called a synchronizing CUDA operation ({where})", UserWarning, stacklevel=1)

    for step in range(5):
        timer.on_train_batch_start()
        sync(f"step {step}")
        timer.on_train_batch_end()
        sync(f"after step {step}")  # the progress bar's read, in a later callback's on_train_batch_end
    seen = [str(w.message).split("(")[1].rstrip(")") for w in timer.sync_records]
    assert seen == ["step 2", "after step 2", "step 3", "after step 3"]
    assert timer.sync_counts()["host_syncs_per_step"] == 2.0


def test_gpu_speed_compile_rows_train_through_the_compiled_loss(tmp_path):
    """``--compile``'s rows: the SAE trained through ``torch.compile``'d losses (dynamo compiled graphs in that
    run, under the trainer's bf16 autocast) and marked so. Bug caught: the flag not reaching the training (eager
    rows under the compiled rows' name)."""
    import numpy as np
    import torch._dynamo
    from torch._dynamo.utils import counters

    mod = load_script()
    prof = mod.PROFILES["small"]
    acts = np.random.default_rng(0).standard_normal((prof["rows"], prof["d_in"]), dtype=np.float32)
    torch._dynamo.reset()
    counters.clear()
    try:
        row = mod.arch_figure("relu", acts, prof, mod.trainer_overrides("cpu"), torch.device("cpu"), tmp_path, tmp_path)
        graphs = counters["stats"]["unique_graphs"]
        assert row["compile"] is False and graphs == 0
        row = mod.arch_figure(
            "relu", acts, prof, mod.trainer_overrides("cpu"), torch.device("cpu"), tmp_path, tmp_path, compile=True
        )
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert row["compile"] is True and graphs >= 1 and row["precision"] == "bf16-mixed"
    assert 0 < row["tokens_per_s"] < math.inf
