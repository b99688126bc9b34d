"""Speed and memory of our code against reference implementations, on CPU in float32.

python bench.py  ->  one table `| what | ours | reference | ratio |`.

Each row is a function registered in ROWS with @row; it returns (ours, reference, ratio) as
strings. Rows run one after another in this process; a row that needs a clean peak-memory
reading measures in a fresh child process.
"""
import concurrent.futures
import functools
import multiprocessing
import statistics
import time

import torch

import wan

ROWS = []


def row(what):
    def register(fn):
        ROWS.append((what, fn))
        return fn
    return register


def interleaved_seconds(ours, reference, runs=7):
    """Median seconds of each, and the median of per-pair ratios. Runs alternate, so both see
    the same background load on a shared machine; the first call of each is a warm-up."""
    ours(), reference()
    times = []
    for _ in range(runs):
        pair = []
        for fn in (ours, reference):
            t0 = time.perf_counter()
            fn()
            pair.append(time.perf_counter() - t0)
        times.append(pair)
    a, b = zip(*times)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in times)


# A Wan2.2-layout VAE (all four levels, z 48, stride 4x16x16) at reduced widths, so a row takes seconds.
BENCH_VAE22 = dict(dim=32, dec_dim=48, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2)


def diffusers_vae22(vae):
    """diffusers' AutoencoderKLWan with our VAE's weights (key table as in tests/test_vae.py)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    from diffusers import AutoencoderKLWan
    from test_vae import wan22_to_diffusers
    kw = BENCH_VAE22
    ref = AutoencoderKLWan(base_dim=kw["dim"], decoder_base_dim=kw["dec_dim"], z_dim=kw["z_dim"],
                           dim_mult=list(kw["dim_mult"]), num_res_blocks=kw["num_res_blocks"],
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_spatial=16)
    ref.load_state_dict(wan22_to_diffusers(vae.state_dict()), strict=True)
    return ref.eval()


@row("VAE 2.2 decode (reduced widths), 3 latent frames -> 9x128x128, s")
def vae_decode_speed():
    torch.manual_seed(0)
    vae = wan.WanVAE22(**BENCH_VAE22).eval()
    ref = diffusers_vae22(vae)
    z = torch.randn(1, 48, 3, 8, 8)
    with torch.no_grad():
        diff = (vae.decode(z) - ref.decode(z * vae.std.view(1, -1, 1, 1, 1) + vae.mean.view(1, -1, 1, 1, 1)).sample)
        assert diff.abs().max() < 1e-4, diff.abs().max()
        ours, theirs, ratio = interleaved_seconds(lambda: vae.decode(z), lambda: ref.decode(z).sample)
    return f"{ours:.3f}", f"{theirs:.3f} (diffusers)", f"{ratio:.2f}"


def rss_kib(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def decode_backward_peak_mb(frames, checkpoint=True):
    """Peak resident-memory growth (MB) of decode + backward to the latent, in a fresh process.

    Linux only: the peak (VmHWM) is reset to the current RSS just before, so model building and
    imports do not count. It includes allocator slack, not just live tensors.
    """
    torch.manual_seed(0)
    vae = wan.WanVAE22(dim=16, dec_dim=32, z_dim=16, dim_mult=(1, 2, 4, 4)).requires_grad_(False)
    z = torch.randn(1, 16, frames, 12, 12, requires_grad=True)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = rss_kib("VmRSS")
    vae.decode(z, checkpoint=checkpoint).square().mean().backward()
    assert torch.isfinite(z.grad).all()
    return (rss_kib("VmHWM") - before) / 1024


@functools.cache
def peak_mb(frames, checkpoint=True):
    """decode_backward_peak_mb in a fresh process (spawned), once per argument set."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(decode_backward_peak_mb, frames, checkpoint).result()


@row("VAE 2.2 decode+backward peak MB (192x192), 9 vs 3 latent frames, checkpointed")
def decode_backward_memory():
    nine, three = peak_mb(9), peak_mb(3)
    return f"{nine:.0f} (9 frames)", f"{three:.0f} (3 frames)", f"{nine / three:.2f}"


@row("VAE 2.2 decode+backward peak MB (192x192), 9 latent frames, checkpointed vs not")
def decode_backward_memory_vs_plain():
    ours, plain = peak_mb(9), peak_mb(9, checkpoint=False)
    return f"{ours:.0f}", f"{plain:.0f} (no checkpoint)", f"{ours / plain:.2f}"


def main():
    print("| what | ours | reference | ratio |")
    print("|---|---|---|---|")
    for what, fn in ROWS:
        ours, ref, ratio = fn()
        print(f"| {what} | {ours} | {ref} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
