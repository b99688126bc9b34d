"""bench.py's GPU rows, run through the same functions at the tiny preset on the CPU."""
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import train
import wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny tensors: a second thread only waits
TINY = dict(preset="tiny", frames=5, size=(32, 32), device="cpu")   # 2 latent frames, 32 tokens


def max_diff(what):
    return float(re.search(r"max \|ours - diffusers\| ([-+.e0-9na]+)", what).group(1))


def test_gpu_rows_without_cuda_print_one_line_and_exit_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "bench.py", "gpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "GPU rows skipped: no CUDA device (torch.cuda.is_available() is False)"
    assert "Traceback" not in out.stderr


def test_dit_flops_count_backward_and_trainable_weights():
    """Forward+backward of every weight is about 3 forwards (input and weight gradients of every
    matmul; attention backward a bit more); with frozen weights, the input gradient alone, ~2."""
    cfg = wan.get_config("tiny")
    fwd = bench.dit_flops(cfg, 9, (64, 64), train_weights=False, backward=False)
    frozen = bench.dit_flops(cfg, 9, (64, 64), train_weights=False, backward=True)
    full = bench.dit_flops(cfg, 9, (64, 64), train_weights=True, backward=True)
    assert fwd > 0 and 1.8 < frozen / fwd < 2.5 and 2.8 < full / fwd < 3.5


def test_dit_row_compares_with_diffusers_on_the_same_weights():
    rows = bench.gpu_dit(**TINY, runs=1, compile=False, rate=1e12)
    what, ours, theirs, _ = rows[0]
    assert "ours vs diffusers" in what and ours > 0 and theirs > 0
    assert max_diff(what) < 1e-4                       # same weights, float32: the same model
    assert "TFLOP/s" in rows[1][0] and rows[1][1] > 0


def test_vae_row_same_output_as_diffusers():
    kw = dict(dim=8, dec_dim=12, z_dim=6, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
    rows = bench.gpu_vae_decode("cpu", latent=(2, 1, 1), kw=kw, runs=1)
    assert [r[0].split(", ")[1].split(" (")[0] for r in rows] == ["float32", "bf16 autocast"]
    assert max_diff(rows[0][0]) < 1e-4 and all(r[1] > 0 and r[2] > 0 for r in rows)


def test_sampling_row_runs_the_same_loop_as_diffusers_calls():
    rows = bench.gpu_sampling(**TINY, steps=2)
    assert len(rows) == 1 and rows[0][1] > 0 and rows[0][2] > 0
    assert max_diff(rows[0][0]) < 1e-3                 # CFG batched vs two calls: the same latent


def test_ipro_stages_time_train_py_own_step():
    """train.ipro_loss as train.py runs it by default, each stage entered as often as the step
    needs it (the KL reference once per windowed step), the stages within the total."""
    generate = wan.generate
    rows = bench.gpu_ipro_sample(**TINY, rate=1e12)
    assert wan.generate is generate                    # the wrappers are gone afterwards
    stages = {re.search(r": (.+) \((\d+) calls\)", r[0]).groups(): r[1:3] for r in rows[:6]}
    K = train.get_args([]).grad_steps
    assert list(stages) == [("condition", "1"), ("rollout", "1"), ("KL reference", str(K)), ("decode", "1"),
                            ("reward", "1"), ("backward", "1")]
    assert all(seconds > 0 and peak > 0 for seconds, peak in stages.values())
    total, stage_sum = rows[6][1:3]
    assert stage_sum <= total and "total s vs stages' sum" in rows[6][0]
    assert rows[7][2] > 0                               # the ideal time of the DiT's FLOPs


def test_memory_rows_run_train_py_with_the_flags_they_name():
    """The GPU memory rows: train.py's args and models with the row's flags (the random weights in
    --base-dtype, kept-fp32 parts in fp32, as load_experts casts), one sample, and the plan's peak."""
    rows = bench.gpu_memory("cpu", settings=[("tiny", 5, (32, 32), ("--base-dtype", "bf16"))])
    what, measured, planned, _ = rows[0]
    assert "--base-dtype bf16" in what and "out of memory" not in what and measured > 0 and planned > 0
    _, args, _, models, _ = bench.ipro_setup("tiny", 5, (32, 32), "cpu", ("--base-dtype", "bf16"))
    dtypes = {n: p.dtype for n, p in models.experts[-1].named_parameters()}
    assert args.base_dtype == "bf16" and any(wan.keeps_fp32(n) for n in dtypes)
    for name, dtype in dtypes.items():
        want = torch.float32 if wan.keeps_fp32(name) or "lora_" in name else torch.bfloat16
        assert dtype == want, name
