"""Image + prompt (+ fine-tuned weights) in, mp4 out.

    python sample.py --model 5b --image in.jpg --prompt "a woman turns to the camera" --out out.mp4
    python sample.py --model a14b --image in.jpg --prompt "..." --steps 8 --guidance 1 --solver euler \
        --lora high=lightning/high_noise_model.safetensors --lora low=lightning/low_noise_model.safetensors
    python sample.py --model tiny --ckpt runs/demo/ipro/model.safetensors --vae assets/tiny_vae.safetensors ...

Defaults are the official ones per model (wan.CONFIGS): TI2V-5B UniPC 50 steps, shift 5, CFG 5,
121 frames at 704x1280, 24 fps; I2V-A14B UniPC 40 steps, CFG 3.5, 81 frames at 480x832, 16 fps.
Everything the run used (seed included) is written to a JSON file beside the mp4.
"""
import argparse
import json
import os
import sys
import time

import torch

import wan

SIZES = {"5b": [(704, 1280), (1280, 704)],
         "a14b": [(720, 1280), (1280, 720), (480, 832), (832, 480)]}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Wan2.2 image-to-video sampling.")
    p.add_argument("--model", default="5b", choices=sorted(wan.CONFIGS))
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", default="out.mp4")
    p.add_argument("--weights", default=None, help="official folder or repo id (default: the preset's repo)")
    p.add_argument("--ckpt", default=None, help="fine-tuned DiT weights (.safetensors, official key names); "
                   "for a14b they replace the low-noise expert")
    p.add_argument("--lora", action="append", default=[], metavar="[high=|low=]FILE",
                   help="merge a LoRA (Lightning layout, or ours); a14b: prefix the expert, default low")
    p.add_argument("--vae", default=None, help="VAE weights (default: from --weights)")
    p.add_argument("--t5", default=None, help="umT5 weights and tokenizer folder (default: from --weights)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="4n+1")
    p.add_argument("--size", default=None, help="H*W, e.g. 704*1280 (official sizes only for 5b/a14b)")
    p.add_argument("--seed", type=int, default=None, help="default: a random seed, recorded in the JSON")
    p.add_argument("--negative-prompt", default=wan.NEG_PROMPT if hasattr(wan, "NEG_PROMPT") else "")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--solver", default="unipc", choices=["unipc", "euler"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="DiT autocast dtype (GPU)")
    return p.parse_args(argv)


def check_args(args, cfg):
    """Everything that can be wrong with the request, before any weight is loaded."""
    frames = args.frames or cfg.frame_num
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"--frames {frames}: the VAE needs 4n+1 frames (e.g. 81, 121)")
    if args.size:
        try:
            size = tuple(int(v) for v in args.size.lower().replace("x", "*").split("*"))
            assert len(size) == 2
        except (ValueError, AssertionError):
            raise ValueError(f"--size {args.size!r}: expected H*W, e.g. 704*1280") from None
    else:
        size = cfg.size
    if cfg.name in SIZES and size not in SIZES[cfg.name]:
        raise ValueError(f"--size {size[0]}*{size[1]} is not an official {cfg.name} size: "
                         f"{', '.join(f'{h}*{w}' for h, w in SIZES[cfg.name])}")
    step = cfg.vae_stride[1] * cfg.patch_size[1]
    if size[0] % step or size[1] % step:
        raise ValueError(f"--size {size}: sides must be multiples of {step}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out {args.out}: folder {out_dir} does not exist or is not writable")
    for lora in args.lora:
        path = lora.split("=", 1)[1] if lora.startswith(("high=", "low=")) else lora
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora {path} does not exist")
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt} does not exist")
    return frames, size


def load_dits(args, cfg, device):
    """The DiT (or A14B's two experts) with LoRAs merged and fine-tuned weights in place."""
    src = args.weights or cfg.repo
    experts = []
    for expert in cfg.experts or (None,):
        if src:
            experts.append(wan.load_dit(cfg, src, expert=expert))
        else:
            print(f"note: the {cfg.name} preset has no official weights; starting from random ones", file=sys.stderr)
            torch.manual_seed(0)
            experts.append(wan.WanModel(cfg))
    if args.ckpt:
        sd = wan.read_state_dict(args.ckpt)
        if any(".lora_down." in k for k in sd):
            wan.merge_lora(experts[-1], sd)
        else:
            wan.load_strict(experts[-1], sd, f"--ckpt {args.ckpt}")
    for lora in args.lora:
        which, path = lora.split("=", 1) if lora.startswith(("high=", "low=")) else ("low", lora)
        if which == "high" and len(experts) < 2:
            raise ValueError(f"--lora high=...: {cfg.name} has one model, no high-noise expert")
        wan.merge_lora(experts[0 if which == "high" else -1], wan.read_state_dict(path))
    return [m.to(device).eval().requires_grad_(False) for m in experts]


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    cfg = wan.get_config(args.model)
    try:
        frames, size = check_args(args, cfg)
        img = wan.load_image(args.image)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}")
    device = torch.device(args.device)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    steps = args.steps or cfg.sample_steps
    guidance = cfg.sample_guide_scale if args.guidance is None else args.guidance
    shift = cfg.sample_shift if args.shift is None else args.shift
    src = args.weights or cfg.repo

    try:
        # Text first (then freed): the 5.7B encoder never sits beside the DiT.
        tokenizer = wan.load_tokenizer(cfg, args.t5 or src or None)
        if args.t5 or src:
            t5 = wan.load_t5(cfg, args.t5 or src, device=device)
        else:
            torch.manual_seed(0)
            t5 = wan.build_t5(cfg).to(device).eval()
        prompts = [args.prompt] + ([args.negative_prompt] if guidance != 1.0 else [])
        for p in prompts:
            if tokenizer.token_count(p) > cfg.text_len:
                raise ValueError(f"prompt has {tokenizer.token_count(p)} tokens, more than text_len={cfg.text_len}: "
                                 f"{p[:60]!r}...")
        contexts = wan.encode_text(prompts, t5, tokenizer)
        del t5
        vae_src = args.vae or src
        if vae_src:
            vae = wan.load_vae(cfg, vae_src, device=device)
        else:
            print("note: no VAE weights for this preset; a random VAE (pass --vae)", file=sys.stderr)
            torch.manual_seed(0)
            vae = wan.build_vae(cfg).to(device).eval()
        experts = load_dits(args, cfg, device)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"error: {err}")

    image = wan.prepare_image(img, cfg, size).to(device)                   # (3, H, W)
    H, W = image.shape[1:]
    st, sh, sw = vae.stride
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(1, vae.z_dim, (frames - 1) // st + 1, H // sh, W // sw, generator=g, device=device)
    if cfg.model_type == "ti2v":
        cond = dict(z_img=vae.encode(image[None, :, None]))
    else:
        video = torch.cat([image[None, :, None], image.new_zeros(1, 3, frames - 1, H, W)], dim=2)
        cond = dict(y=wan.a14b_condition(vae.encode(video)))
    # Official guidance tuples are (low noise, high noise); generate takes them in expert order.
    guide = (guidance, guidance) if len(experts) == 2 else guidance
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" and device.type == "cuda" \
        else torch.autocast(device.type, enabled=False)
    t0 = time.time()
    with amp:
        z = wan.generate(experts if len(experts) > 1 else experts[0], cfg, noise, contexts[:1],
                         context_null=contexts[1:] or None, steps=steps, shift=shift, guidance=guide,
                         solver=args.solver, progress=True, **cond)
    video = vae.decode(z, checkpoint=False)[0]                             # (3, F, H, W)
    meta = dict(model=cfg.name, image=os.path.abspath(args.image), prompt=args.prompt, seed=seed, steps=steps,
                frames=frames, size=[H, W], guidance=guidance, shift=shift, solver=args.solver,
                negative_prompt=args.negative_prompt if guidance != 1.0 else None, weights=src, ckpt=args.ckpt,
                lora=args.lora, fps=cfg.sample_fps, seconds=round(time.time() - t0, 2))
    wan.save_video(args.out, video, cfg.sample_fps, metadata=meta)
    print(f"wrote {args.out} ({frames} frames, {H}x{W}, seed {seed})")


if __name__ == "__main__":
    main()
