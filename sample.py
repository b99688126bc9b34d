"""Image + prompt (+ fine-tuned weights) in, mp4 out.

    python sample.py --model 5b --image in.jpg --prompt "a woman turns to the camera" --out out.mp4
    python sample.py --model a14b --image in.jpg --prompt "..." --sample-steps 8 --guidance 1 --solver euler \
        --lora high=lightning/high_noise_model.safetensors --lora low=lightning/low_noise_model.safetensors
    python sample.py --model tiny --ckpt runs/demo/ipro/model.safetensors --vae assets/tiny_vae.safetensors ...

Defaults are the official ones per model (wan.CONFIGS): TI2V-5B UniPC 50 steps, shift 5, CFG 5,
121 frames, 24 fps; I2V-A14B UniPC 40 steps, CFG 3.5, 81 frames, 16 fps.
--size sets the pixel area, not the shape: as in the official code the video keeps the image's
aspect ratio (TI2V: the best multiple-of-32 size, resized to cover and centre-cropped; A14B:
resized to that area, no crop), so 704*1280 and 1280*704 give the same video.
Everything the run used (seed included) is written to a JSON file beside the mp4; passing its
settings back as flags reproduces the video.
"""
import argparse
import json
import os
import sys
import time

import torch

import wan

# The official SUPPORTED_SIZES (wan/configs/__init__.py); only their area is used.
SIZES = {"5b": [(704, 1280), (1280, 704)],
         "a14b": [(720, 1280), (1280, 720), (480, 832), (832, 480)]}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Wan2.2 image-to-video: image + prompt in, mp4 (and a JSON of "
                                "the settings) out. Unset options take the preset's official defaults.")
    p.add_argument("--model", default="5b", choices=sorted(wan.CONFIGS),
                   help="preset: 5b (TI2V-5B, the default), a14b (I2V-A14B, two experts) or tiny (CPU demo)")
    p.add_argument("--image", required=True, help="first frame: any image PIL reads (gray, RGBA, 16-bit too)")
    p.add_argument("--prompt", required=True, help="what happens in the video")
    p.add_argument("--out", default="out.mp4", help="the .mp4 to write; its settings go to the .json beside it")
    p.add_argument("--weights", default=None, help="official folder or repo id (default: the preset's repo)")
    p.add_argument("--ckpt", default=None, help="fine-tuned DiT weights (.safetensors, official key names) "
                   "or a LoRA; for a14b they go into the low-noise expert")
    p.add_argument("--lora", action="append", default=[], metavar="[high=|low=]FILE",
                   help="merge a LoRA (Lightning layout, or ours); a14b: prefix the expert, default low")
    p.add_argument("--vae", default=None, help="VAE weights (default: from --weights)")
    p.add_argument("--t5", default=None, help="umT5 weights and tokenizer folder (default: from --weights)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampler steps (5b 50, a14b 40, tiny 8)")
    p.add_argument("--frames", type=int, default=None, help="4n+1 frames (5b 121, a14b 81, tiny 9)")
    p.add_argument("--size", default=None, help="H*W whose area the video gets (5b 704*1280, a14b 480*832, "
                   "tiny 64*64); 5b and a14b take their official sizes only")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: a random one, kept in the JSON)")
    p.add_argument("--negative-prompt", default=wan.NEG_PROMPT,
                   help="what guidance steers away from (default: the official one; unused at guidance 1)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 1 = off "
                   "(5b 5, a14b 3.5, tiny 1)")
    p.add_argument("--shift", type=float, default=None, help="flow-matching schedule shift (5)")
    p.add_argument("--solver", default="unipc", choices=["unipc", "euler"],
                   help="unipc (official) or euler (Lightning's, with its 4-8 steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="DiT autocast and weight dtype on GPU; "
                   "the CPU always runs fp32")
    return p.parse_args(argv)


def fill_and_check(args, cfg):
    """Fill the preset's defaults into args, and raise on everything that can be wrong with the
    request before any weight is loaded. Returns the size (H, W) whose area the video gets."""
    args.frames = cfg.frame_num if args.frames is None else args.frames
    args.sample_steps = cfg.sample_steps if args.sample_steps is None else args.sample_steps
    args.guidance = cfg.sample_guide_scale if args.guidance is None else args.guidance
    args.shift = cfg.sample_shift if args.shift is None else args.shift
    args.size = args.size or f"{cfg.size[0]}*{cfg.size[1]}"
    args.weights = args.weights or cfg.repo or None
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    if args.frames < 1 or (args.frames - 1) % 4:
        raise ValueError(f"--frames {args.frames}: the VAE needs 4n+1 frames (e.g. 81, 121)")
    if args.sample_steps < 1:
        raise ValueError(f"--sample-steps {args.sample_steps}: at least 1")
    if not args.shift > 0:
        raise ValueError(f"--shift {args.shift}: must be > 0 (the schedule divides by it; official: 5)")
    if not args.guidance > 0:
        raise ValueError(f"--guidance {args.guidance}: must be > 0 (1 = off)")
    wan.check_device(args.device)
    try:
        size = tuple(int(v) for v in args.size.lower().replace("x", "*").split("*"))
        assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
        raise ValueError(f"--size {args.size!r}: expected H*W, e.g. 704*1280") from None
    if cfg.name in SIZES and size not in SIZES[cfg.name]:
        raise ValueError(f"--size {size[0]}*{size[1]} is not an official {cfg.name} size: "
                         f"{', '.join(f'{h}*{w}' for h, w in SIZES[cfg.name])}")
    step = cfg.vae_stride[1] * cfg.patch_size[1]
    if size[0] % step or size[1] % step:
        raise ValueError(f"--size {size[0]}*{size[1]}: sides must be multiples of {step}")
    # The decoded video alone, in float32 (with its uint8 copy for the encoder), must fit in memory.
    need = args.frames * size[0] * size[1] * 3 * (4 + 1)
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"--frames {args.frames}: the decoded video alone needs {need / 2**30:.0f} GiB, more than "
                         f"this machine's {have / 2**30:.0f} GiB of memory (official: {cfg.frame_num} frames)")
    # The JSON goes beside the video with its extension swapped: an --out of x.json would overwrite it.
    if not args.out.endswith(".mp4"):
        raise ValueError(f"--out {args.out}: must end in .mp4")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out {args.out}: folder {out_dir} does not exist or is not writable")
    # The settings JSON replaces only a settings JSON: never the user's own notes.json beside notes.mp4.
    meta = os.path.splitext(args.out)[0] + ".json"
    if os.path.exists(meta) and not written_here(meta):
        raise ValueError(f"--out {args.out}: {meta} exists and is not a settings file of sample.py; the settings "
                         f"would replace it: move it or choose another --out")
    for lora in args.lora:
        path = lora.split("=", 1)[1] if lora.startswith(("high=", "low=")) else lora
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora {path} does not exist")
    if args.ckpt and not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt} does not exist")
    return size


def written_here(path):
    """Whether the JSON file at path is one that sample.py wrote (its marker; older ones by their keys)."""
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("written_by") == "sample.py" or
                                       {"prompt", "seed", "steps", "image", "fps"} <= meta.keys())


def fail(err):
    """Exit with one line and no traceback; KeyError's own str() would wrap the message in quotes."""
    raise SystemExit(f"error: {err.args[0] if isinstance(err, KeyError) else err}")


@torch.no_grad()
def main(argv=None):
    """Returns the video (3, F, H, W) in [-1, 1] that was written to --out."""
    args = get_args(argv)
    cfg = wan.get_config(args.model)
    try:
        size = fill_and_check(args, cfg)
        image = wan.prepare_image(wan.load_image(args.image), cfg, size)      # (3, H, W) in [-1, 1]
    except (ValueError, FileNotFoundError) as err:
        fail(err)
    print(json.dumps(vars(args), ensure_ascii=False))
    device = torch.device(args.device)
    src = args.weights

    try:
        # Text first (then freed): the 5.7B encoder never sits beside the DiT.
        tokenizer = wan.load_tokenizer(cfg, args.t5 or src)
        for flag, text in [("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)]:
            if (flag == "--prompt" or args.guidance != 1.0) and tokenizer.token_count(text) > cfg.text_len:
                raise ValueError(f"{flag} has {tokenizer.token_count(text)} tokens, more than the {cfg.name} "
                                 f"model's text_len={cfg.text_len}: {text[:60]!r}...")
        if args.t5 or src:
            t5 = wan.load_t5(cfg, args.t5 or src, device=device)
        else:
            torch.manual_seed(0)
            t5 = wan.build_t5(cfg).to(device).eval()
        prompts = [args.prompt] + ([args.negative_prompt] if args.guidance != 1.0 else [])
        contexts = wan.encode_text(prompts, t5, tokenizer)
        del t5
        vae_src = args.vae or src
        if vae_src:
            vae = wan.load_vae(cfg, vae_src, device=device)
        else:
            print("note: no VAE weights for this preset; a random VAE (pass --vae)", file=sys.stderr)
            torch.manual_seed(0)
            vae = wan.build_vae(cfg).to(device).eval()
        if not src:
            print(f"note: the {cfg.name} preset has no official weights; the DiT starts from random ones "
                  f"unless --ckpt holds full weights", file=sys.stderr)
        # bf16 storage under bf16 autocast: the same matmuls (autocast casts fp32 weights to bf16 for
        # each call), half the memory; the time embedding, modulation and head stay fp32 (cast_dit).
        bf16 = args.dtype == "bf16" and device.type == "cuda"
        experts = wan.load_experts(cfg, src, args.ckpt, args.lora, device,
                                   dtype=torch.bfloat16 if bf16 else torch.float32)
    except (ValueError, FileNotFoundError, KeyError) as err:
        fail(err)

    image = image.to(device)
    H, W = image.shape[1:]
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" and device.type == "cuda" \
        else torch.autocast(device.type, enabled=False)
    t0 = time.time()
    video = wan.sample_video(experts, cfg, vae, image[None], args.frames, contexts[:1], contexts[1:] or None,
                             seed=args.seed, amp=amp, steps=args.sample_steps, shift=args.shift,
                             guidance=args.guidance, solver=args.solver, progress=True)    # (3, F, H, W)
    meta = dict(vars(args), image=os.path.abspath(args.image), height=H, width=W, fps=cfg.sample_fps,
                seconds=round(time.time() - t0, 2), written_by="sample.py")
    try:
        wan.save_video(args.out, video, cfg.sample_fps, metadata=meta)      # refuses a non-finite video
    except ValueError as err:
        fail(err)
    print(f"wrote {args.out} ({args.frames} frames, {H}x{W}, seed {args.seed})")
    return video


if __name__ == "__main__":
    main()
