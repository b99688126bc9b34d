"""sample.py end to end on CPU (issue #5): the tiny preset, and stand-ins of 5b and a14b (the official
presets shrunk with wan.get_config, their conditioning kept, weights written in the official layout)."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import sample
import wan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACE = os.path.join(REPO, "assets", "faces", "person_a_1.jpg")   # 204 x 244 (w x h)
PROMPT = "a person smiles at the camera"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small, and the machine's 2 cores are shared: two oneDNN threads waiting on each
    other made one run 4x slower than a single thread did (12 s against 3 s, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_sample(out, *flags, model="tiny", image=FACE, prompt=PROMPT):
    """sample.py in this process: the video it returned, and the JSON it wrote beside the mp4."""
    video = sample.main(["--model", model, "--image", str(image), "--prompt", prompt, "--out", str(out), *flags])
    with open(str(out)[:-len(".mp4")] + ".json") as fh:
        return video, json.load(fh)


def to_pixels(frames):
    """uint8 (F, H, W, 3) read from an mp4 -> (3, F, H, W) in [-1, 1], the layout sample.py returns."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def half(video):
    """(3, F, H, W) -> (F, 3, H/2, W/2), 2x2 means."""
    return F.avg_pool2d(video.transpose(0, 1), 2)


# -----------------------------------------------------------------------------
# Stand-ins for the official presets: same model type, VAE class, experts and folder layout, CPU size.
# They are renamed because the official size check would (rightly) demand 480*832 pixels or more.


def standin(name):
    vae = dict(dim=8, dec_dim=8) if name == "5b" else dict(dim=8)
    cfg = wan.get_config(name, dim=64, ffn_dim=128, freq_dim=64, text_dim=32, num_heads=2, num_layers=2,
                         vae_kwargs=vae, t5_kwargs=wan.CONFIGS["tiny"].t5_kwargs,
                         size=(128, 128) if name == "5b" else (64, 64), frame_num=5, sample_steps=2)
    return dataclasses.replace(cfg, name=f"{name}-standin")


def write_official_folder(cfg, folder, seed=0):
    """DiT (per expert subfolder for A14B), VAE .pth, umT5 .pth in bf16 and google/umt5-xxl/tokenizer.json,
    named as in the released Hugging Face repos."""
    torch.manual_seed(seed)
    for expert in cfg.experts or ("",):
        model = wan.WanModel(cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.05)  # a new model's head is zero: v = 0 whatever it sees
        os.makedirs(os.path.join(folder, expert), exist_ok=True)
        save_file(model.state_dict(), os.path.join(folder, expert, "diffusion_pytorch_model.safetensors"))
    torch.save(wan.build_vae(cfg).state_dict(), os.path.join(folder, wan.VAE_FILES[cfg.vae]))
    torch.save({k: v.bfloat16() for k, v in wan.build_t5(cfg).state_dict().items()}, os.path.join(folder, wan.T5_FILE))
    words = ["<pad>", "</s>", "<unk>"] + PROMPT.split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(os.path.join(folder, wan.TOKENIZER_DIR))
    tok.save(os.path.join(folder, wan.TOKENIZER_DIR, "tokenizer.json"))


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    """{"5b": (cfg, folder), "a14b": (cfg, folder)}; register them with monkeypatch per test."""
    out = {}
    for name in ("5b", "a14b"):
        cfg, folder = standin(name), tmp_path_factory.mktemp(name)
        write_official_folder(cfg, str(folder))
        out[name] = cfg, folder
    return out


@pytest.fixture
def register(standins, monkeypatch):
    def register(name):
        cfg, folder = standins[name]
        monkeypatch.setitem(wan.CONFIGS, cfg.name, cfg)
        return cfg, folder
    return register


# -----------------------------------------------------------------------------
# TI2V: the first frame is the input image, up to the VAE


@pytest.mark.parametrize("name", ["tiny", "5b"])
def test_ti2v_first_frame_is_the_image_through_the_vae(name, tmp_path, register):
    if name == "tiny":
        cfg, vae_file = wan.CONFIGS["tiny"], str(tmp_path / "vae.safetensors")
        torch.manual_seed(1)
        save_file(wan.build_vae(cfg).state_dict(), vae_file)
        video, meta = run_sample(tmp_path / "out.mp4", "--vae", vae_file, "--seed", "3")
    else:
        cfg, folder = register(name)
        vae_file = str(folder / wan.VAE_FILES[cfg.vae])
        video, meta = run_sample(tmp_path / "out.mp4", "--weights", str(folder), "--seed", "3", model=cfg.name)
    vae = wan.load_vae(cfg, vae_file)
    image = wan.prepare_image(wan.load_image(FACE), cfg, cfg.size)                 # (3, H, W)
    reconstructed = vae.decode(vae.encode(image[None, :, None]), checkpoint=False)[0, :, 0]
    assert video.shape == (3, cfg.frame_num, *image.shape[1:])
    assert (video[:, 0] - reconstructed).abs().max() <= 1e-5
    assert (video[:, -1] - reconstructed).abs().mean() > 0.01  # the other frames are generated, not copies
    assert [meta["height"], meta["width"]] == list(image.shape[1:])


DEMO_VAE = os.path.join(REPO, "assets", "tiny_vae.safetensors")


@pytest.mark.skipif(not os.path.exists(DEMO_VAE), reason="no assets/tiny_vae.safetensors (python data.py fit-vae)")
def test_first_frame_of_the_mp4_looks_like_the_input_image_through_the_demo_vae(tmp_path):
    # A random VAE draws noise, so only a fitted one can show the image itself: PSNR 22.4 dB here (measured);
    # the same frame mirrored, or flat grey, scores 14-15 dB.
    run_sample(tmp_path / "out.mp4", "--vae", DEMO_VAE, "--frames", "5", "--seed", "0")
    image = wan.prepare_image(wan.load_image(FACE), wan.CONFIGS["tiny"], (64, 64))
    first = to_pixels(iio.imread(tmp_path / "out.mp4"))[:, 0]
    assert 10 * torch.log10(4 / (first - image).square().mean()) > 20


# -----------------------------------------------------------------------------
# The mp4 and its JSON


def flags_from(meta):
    """The JSON's settings back as command-line flags."""
    flags = []
    for key in vars(sample.get_args(["--image", "-", "--prompt", "-"])):
        if meta[key] is None:
            continue
        for v in meta[key] if isinstance(meta[key], list) else [meta[key]]:
            flags += [f"--{key.replace('_', '-')}", str(v)]
    return flags


def test_mp4_round_trip_and_json_reproduces_the_video(tmp_path):
    square = tmp_path / "square.png"
    Image.open(FACE).crop((0, 20, 204, 224)).save(square)
    video, meta = run_sample(tmp_path / "a.mp4", "--frames", "5", "--size", "48*48", image=square)  # no --seed
    frames = iio.imread(tmp_path / "a.mp4")
    assert frames.shape == (5, 48, 48, 3) and frames.dtype == np.uint8
    # yuv420p keeps colour at half resolution, and these random models draw pixel noise: compare 2x2 means.
    assert (half(to_pixels(frames)) - half(video)).abs().mean() < 0.03
    assert set(vars(sample.get_args(["--image", "-", "--prompt", "-"]))) <= set(meta)
    assert isinstance(meta["seed"], int) and meta["frames"] == 5 and meta["size"] == "48*48"
    assert meta["sample_steps"] == 8 and meta["guidance"] == 1.0 and meta["fps"] == 8
    # The same settings, the recorded seed included, give the same video, bit for bit.
    again = sample.main(flags_from(dict(meta, out=str(tmp_path / "b.mp4"))))
    assert torch.equal(again, video)
    assert np.array_equal(iio.imread(tmp_path / "b.mp4"), frames)
    other = sample.main(flags_from(dict(meta, out=str(tmp_path / "c.mp4"), seed=meta["seed"] + 1)))
    assert (other - video).abs().mean() > 0.01


def test_a_failed_write_leaves_the_old_video_and_no_file(tmp_path, monkeypatch):
    video = torch.zeros(3, 5, 16, 16)
    wan.save_video(str(tmp_path / "v.mp4"), video, fps=8)
    before = (tmp_path / "v.mp4").read_bytes()

    def rename_fails(src, dst):  # the new mp4 is complete, but cannot take the old one's place
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", rename_fails)
    with pytest.raises(OSError, match="disk full"):
        wan.save_video(str(tmp_path / "v.mp4"), video + 0.5, fps=8, metadata={"seed": 1})
    assert os.listdir(tmp_path) == ["v.mp4"] and (tmp_path / "v.mp4").read_bytes() == before


# -----------------------------------------------------------------------------
# The A14B path: two experts, the y condition, LoRAs and --ckpt


def lora_file(cfg, path, seed):
    """A random LoRA on every attention and FFN linear, in the Lightning layout, and its weight deltas."""
    torch.manual_seed(seed)
    model = wan.add_lora(wan.WanModel(cfg), rank=4, alpha=2.0)
    for m in model.modules():
        if isinstance(m, wan.LoRALinear):
            torch.nn.init.normal_(m.lora_up.weight, std=0.5)
    save_file(wan.lora_state_dict(model), path)
    return {f"{name}.weight": 2.0 / 4 * m.lora_up.weight.detach() @ m.lora_down.weight.detach()
            for name, m in model.named_modules() if isinstance(m, wan.LoRALinear)}


def test_a14b_two_experts_y_condition_lora_and_ckpt(tmp_path, register, monkeypatch):
    cfg, folder = register("a14b")
    experts = {e: wan.read_state_dict(str(folder / e / "diffusion_pytorch_model.safetensors")) for e in cfg.experts}
    calls, forward = [], wan.WanModel.forward

    def spy(model, x, t, context, y=None):
        # Which expert runs is told by its weights: the high-noise file's or the low-noise file's.
        w = model.head.head.weight
        name = next(e for e, sd in experts.items() if torch.equal(sd["head.head.weight"], w))
        calls.append((name, t.flatten()[0].item(), None if y is None else y.clone()))
        return forward(model, x, t, context, y=y)

    monkeypatch.setattr(wan.WanModel, "forward", spy)
    base, meta = run_sample(tmp_path / "base.mp4", "--weights", str(folder), "--seed", "0", model=cfg.name)
    monkeypatch.setattr(wan.WanModel, "forward", forward)
    h, w = meta["height"] // 8, meta["width"] // 8
    assert (meta["height"], meta["width"]) == (64, 48) and base.shape == (3, 5, 64, 48)
    # UniPC 2 steps at shift 5: t = 999 on the high-noise expert, then 833 (< 900) on the low-noise
    # one; CFG runs each as one call on a doubled batch (conditional and unconditional halves).
    # y = [4 mask channels, 16 latent channels] over the 2 latent frames.
    assert [name for name, _, _ in calls] == ["high_noise_model", "low_noise_model"]
    assert calls[0][1] == 999 and calls[1][1] < 900
    for _, _, y in calls:
        assert y.shape == (2, 20, 2, h, w)
        assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1] == 0).all()
    assert torch.equal(calls[0][2], calls[-1][2])  # one condition for both experts

    # --lora low=L, --ckpt L and --ckpt (low-noise weights + L's deltas) are the same model.
    delta = lora_file(cfg, str(tmp_path / "lora.safetensors"), seed=1)
    merged = {k: v + delta.get(k, 0) for k, v in experts["low_noise_model"].items()}
    save_file(merged, str(tmp_path / "full.safetensors"))
    low, _ = run_sample(tmp_path / "low.mp4", "--weights", str(folder), "--seed", "0", "--lora",
                 f"low={tmp_path / 'lora.safetensors'}", model=cfg.name)
    ckpt_lora, _ = run_sample(tmp_path / "ckpt_lora.mp4", "--weights", str(folder), "--seed", "0", "--ckpt",
                       str(tmp_path / "lora.safetensors"), model=cfg.name)
    ckpt_full, _ = run_sample(tmp_path / "ckpt_full.mp4", "--weights", str(folder), "--seed", "0", "--ckpt",
                       str(tmp_path / "full.safetensors"), model=cfg.name)
    assert (low - base).abs().max() > 0.05
    torch.testing.assert_close(ckpt_lora, low, rtol=0, atol=1e-5)
    torch.testing.assert_close(ckpt_full, low, rtol=0, atol=1e-5)

    # --lora high=L changes the high-noise expert only: the same as a folder whose high-noise weights carry L.
    high_folder = tmp_path / "high_merged"
    high_folder.mkdir()
    for entry in os.listdir(folder):
        if entry != "high_noise_model":
            os.symlink(folder / entry, high_folder / entry)
    (high_folder / "high_noise_model").mkdir()
    save_file({k: v + delta.get(k, 0) for k, v in experts["high_noise_model"].items()},
              str(high_folder / "high_noise_model" / "diffusion_pytorch_model.safetensors"))
    high, _ = run_sample(tmp_path / "high.mp4", "--weights", str(folder), "--seed", "0", "--lora",
                  f"high={tmp_path / 'lora.safetensors'}", model=cfg.name)
    high_ref, _ = run_sample(tmp_path / "high_ref.mp4", "--weights", str(high_folder), "--seed", "0", model=cfg.name)
    assert (high - base).abs().max() > 1e-3 and (high - low).abs().max() > 1e-3  # float noise: ~1e-6
    torch.testing.assert_close(high, high_ref, rtol=0, atol=1e-5)


# -----------------------------------------------------------------------------
# Image preprocessing: the official TI2V size rule, and images of every mode


def blank(w, h):
    return Image.new("RGB", (w, h), (90, 120, 200))


@pytest.mark.parametrize("w, h, expected", [
    # best_output_size at area 704*1280 in steps of 32, worked by hand: ratio 1.25, ow = 1061.3 -> 1056,
    # oh1 = 901120 / 1056 = 853.3 -> 832; height first gives the same (1056, 832).
    (1000, 800, (832, 1056)),
    # 9:16: width first (704, 1280) is off by 2.3 %, height first oh = 1265.7 -> 1248, ow = 722 -> 704
    # is off by 0.3 %: so not 1280 but 1248 high.
    (720, 1280, (1248, 704)),
    # oh = 901120 / 563.2 is exactly 1600, a multiple of 32, but the official float division gives
    # 1599.99..., hence 1568 (sqrt(area / ratio) would give 1600).
    (660, 1875, (1568, 544)),
])
def test_ti2v_output_size_follows_the_official_rule(w, h, expected):
    x = wan.prepare_image(blank(w, h), wan.CONFIGS["5b"], (704, 1280))
    assert x.shape == (3, *expected)
    assert wan.prepare_image(blank(w, h), wan.CONFIGS["5b"], (1280, 704)).shape == x.shape  # area only


def test_other_sizes_and_extreme_images():
    # tiny, area 64*64 in steps of 8: ratio 0.836, ow = 58.5 -> 56, oh1 = 73.1 -> 72 (off 7 %) beats 64x64.
    assert wan.prepare_image(wan.load_image(FACE), wan.CONFIGS["tiny"], (64, 64)).shape == (3, 72, 56)
    # A14B: bicubic to the area, no crop: sqrt(399360 * 0.8) = 565.2 -> 560, sqrt(399360 / 0.8) = 706.5 -> 704.
    assert wan.prepare_image(blank(1000, 800), wan.CONFIGS["a14b"], (480, 832)).shape == (3, 560, 704)
    for cfg in (wan.CONFIGS["tiny"], wan.CONFIGS["a14b"]):
        with pytest.raises(ValueError, match="too extreme"):
            wan.prepare_image(blank(1, 4000), cfg, cfg.size)


def test_image_modes_load_as_rgb(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "gray.png")
    Image.fromarray(np.full((8, 8), 16384, np.uint16)).save(tmp_path / "gray16.png")   # a dark 16-bit photo
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (0, 0, 255, 255)           # opaque blue
    rgba[:, 4:] = (255, 0, 0, 0)             # fully transparent: the white background shows
    rgba[0, 4:] = (255, 0, 0, 128)           # half-transparent red on white
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30])
    pal.save(tmp_path / "palette.png", transparency=0)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "rotated.jpg", exif=rotated_exif())
    expect = {"gray.png": [100, 100, 100], "gray16.png": [64, 64, 64], "palette.png": [10, 200, 30]}
    for name, rgb in expect.items():
        img = wan.load_image(str(tmp_path / name))
        assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == rgb, name
    a = np.asarray(wan.load_image(str(tmp_path / "rgba.png"))).astype(int)
    assert a[1, 0].tolist() == [0, 0, 255] and a[1, 7].tolist() == [255, 255, 255]
    assert a[0, 7, 0] == 255 and abs(a[0, 7, 1] - 127) <= 1
    assert wan.load_image(str(tmp_path / "rotated.jpg")).size == (20, 40)  # as a viewer shows it
    # And the whole pipeline takes a 16-bit file.
    video, _ = run_sample(tmp_path / "gray16.mp4", "--frames", "1", "--sample-steps", "1", image=tmp_path / "gray16.png")
    assert video.shape == (3, 1, 64, 64)


def rotated_exif():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return exif


# -----------------------------------------------------------------------------
# The command line: help, an offline tiny run, and bad input, as subprocesses (started all at once,
# so that their torch imports overlap). {dir} is the cases' folder.

BAD = {
    "missing image": (["--image", "{dir}/nope.jpg"], "image .*nope.jpg does not exist"),
    "unreadable image": (["--image", "{dir}/broken.jpg"], "cannot read image .*broken.jpg"),
    "frames not 4n+1": (["--frames", "8"], "--frames 8: the VAE needs 4n\\+1 frames"),
    "5b size": (["--model", "5b", "--size", "720*1280"], "not an official 5b size: 704\\*1280, 1280\\*704"),
    "a14b size": (["--model", "a14b", "--size", "704*1280"],
                  "not an official a14b size: 720\\*1280, 1280\\*720, 480\\*832, 832\\*480"),
    "prompt too long": (["--prompt", "a person smiles " * 7],
                        "--prompt has 112 tokens, more than the tiny model's text_len=96"),
    "weights offline": (["--model", "5b"], "could not get .* of 'Wan-AI/Wan2.2-TI2V-5B'.*offline=1"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """{case: (returncode, stdout, stderr, its output folder)}, offline with an empty Hugging Face cache."""
    d = tmp_path_factory.mktemp("cli")
    (d / "broken.jpg").write_text("not an image")
    (d / "hf_home").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(d / "hf_home"))
    cases = {case: [f.format(dir=d) for f in flags] for case, (flags, _) in BAD.items()}
    cases["tiny offline"] = ["--frames", "5"]
    procs = {}
    for case, flags in cases.items():
        out = d / re.sub(r"\W", "_", case)
        out.mkdir()
        argv = ["--model", "tiny", "--image", FACE, "--prompt", PROMPT, "--out", str(out / "video.mp4"), *flags]
        procs[case] = out, subprocess.Popen([sys.executable, os.path.join(REPO, "sample.py"), *argv], env=env,
                                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs["help"] = d, subprocess.Popen([sys.executable, os.path.join(REPO, "sample.py"), "-h"], env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for case, (out, p) in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        results[case] = p.returncode, stdout, stderr, out
    return results


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_clear_message_no_traceback_no_video(case, cli):
    returncode, stdout, stderr, out = cli[case]
    assert returncode == 1 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(BAD[case][1], errors[0]), stderr
    assert os.listdir(out) == []  # no mp4, no temporary file, no JSON


def test_tiny_runs_offline_with_a_progress_bar(cli):
    returncode, stdout, stderr, out = cli["tiny offline"]
    assert returncode == 0, stderr
    assert sorted(os.listdir(out)) == ["video.json", "video.mp4"]
    assert iio.imread(out / "video.mp4").shape == (5, 72, 56, 3)
    settings = json.loads(stdout.splitlines()[0])  # the resolved settings, printed once at the start
    assert settings["frames"] == 5 and settings["sample_steps"] == 8 and isinstance(settings["seed"], int)
    assert re.search(r"sampling: 100%\S* 8/8", stderr)


def test_help_describes_every_option(cli):
    returncode, stdout, _, _ = cli["help"]
    assert returncode == 0 and stdout.startswith("usage: sample.py")
    for key in vars(sample.get_args(["--image", "-", "--prompt", "-"])):
        flag = "--" + key.replace("_", "-")
        # argparse puts the description after the option on its line, or on the next, indented.
        assert re.search(rf"^  {flag}\b[^\n]*?\S  +\S|^  {flag}\b[^\n]*\n {{20,}}\S", stdout, re.M), flag


@pytest.mark.parametrize("flags, message", [
    (["--frames", "0"], "--frames 0: the VAE needs 4n\\+1"),
    (["--sample-steps", "0"], "--sample-steps 0: at least 1"),
    (["--size", "64x0"], "--size '64x0': expected H\\*W"),
    (["--out", "{tmp}/video.json"], "must end in .mp4"),
    (["--image", "{tmp}/tall.png"], "image of 1x4000 pixels: its aspect ratio is too extreme"),
    (["--ckpt", "{tmp}/wrong.safetensors"], "^error: fine-tuned weights .*keys do not match the model: "
                                            "missing \\[.*unexpected \\['not.a.dit.key'\\]"),
])
def test_more_bad_input(flags, message, tmp_path):
    blank(1, 4000).save(tmp_path / "tall.png")
    save_file({"not.a.dit.key": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit:
        sample.main(["--model", "tiny", "--image", FACE, "--prompt", PROMPT, "--out", str(tmp_path / "v.mp4"),
                     *[f.format(tmp=tmp_path) for f in flags]])
    assert re.search(message, str(exit.value.code))
    assert sorted(os.listdir(tmp_path)) == before


# -----------------------------------------------------------------------------
# Files that are not what they claim, broken LoRAs, impossible settings (issue #18): one line each,
# naming the input, and no file written


def tiny_sd(seed=0):
    torch.manual_seed(seed)
    return wan.WanModel(wan.get_config("tiny")).state_dict()


def broken_lora(kind):
    """A one-layer LoRA in the Lightning layout, broken in one way."""
    cfg = wan.get_config("tiny")
    name, r = "diffusion_model.blocks.0.self_attn.q", 4
    down, up = torch.randn(r, cfg.dim), torch.randn(cfg.dim, r)
    if kind == "wrong shape":
        down = torch.randn(r, cfg.dim + 3)
    if kind == "rank mismatch":
        up = torch.randn(cfg.dim, r + 1)
    if kind == "unknown module":
        name = "diffusion_model.blocks.0.self_attn.nope"
    sd = {f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(4.0)}
    if kind != "missing up":
        sd[f"{name}.lora_up.weight"] = up
    return sd


@pytest.mark.parametrize("flags, message", [
    (["--ckpt", "{tmp}/text.safetensors"], "^error: weights .*text.safetensors: not a readable .safetensors file"),
    (["--ckpt", "{tmp}/cut.safetensors"], "^error: weights .*cut.safetensors: not a readable .safetensors file"),
    (["--ckpt", "{tmp}/pickled.pth"], "^error: weights .*pickled.pth: the file holds pickled Python objects"),
    (["--ckpt", "{tmp}/nan.safetensors"], "^error: fine-tuned weights .*nan.safetensors: non-finite values"),
    (["--vae", "{tmp}/text.safetensors"], "^error: weights .*text.safetensors: not a readable"),
    (["--ckpt", "{tmp}/wrong shape.safetensors"], "^error: LoRA .*wrong shape.safetensors: .*self_attn.q has "
                                                  "lora_down \\(4, 131\\) and lora_up \\(128, 4\\); the layer is 128x128"),
    (["--ckpt", "{tmp}/rank mismatch.safetensors"], "^error: LoRA .*self_attn.q has lora_down of rank 4 but lora_up "
                                                    "of rank 5"),
    (["--lora", "{tmp}/unknown module.safetensors"], "^error: LoRA .*: blocks.0.self_attn.nope is not a layer"),
    (["--lora", "{tmp}/missing up.safetensors"], "^error: LoRA .*self_attn.q has lora_down without lora_up"),
    (["--shift", "0"], "^error: --shift 0.0: must be > 0"),
    (["--frames", "100001", "--size", "4096*4096"], "^error: --frames 100001: the decoded video alone needs"),
    (["--device", "cuda:7"], "^error: --device cuda:7: "),
])
def test_files_and_settings_that_are_wrong(flags, message, tmp_path):
    cfg = wan.get_config("tiny")
    assert cfg.dim == 128, "the expected shapes above are the tiny preset's"
    (tmp_path / "text.safetensors").write_text("these are not weights\n")
    save_file(tiny_sd(), str(tmp_path / "full.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:5000])
    torch.save({"model": wan.WanModel(cfg)}, tmp_path / "pickled.pth")
    sd = tiny_sd()
    sd["blocks.0.ffn.0.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    for kind in ("wrong shape", "rank mismatch", "unknown module", "missing up"):
        save_file(broken_lora(kind), str(tmp_path / f"{kind}.safetensors"))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as exit:
        sample.main(["--model", "tiny", "--image", FACE, "--prompt", PROMPT, "--out", str(tmp_path / "v.mp4"),
                     "--device", "cpu", *[f.format(tmp=tmp_path) for f in flags]])
    print(exit.value.code)
    assert re.search(message, str(exit.value.code)), exit.value.code
    assert sorted(os.listdir(tmp_path)) == before


def test_an_fp16_checkpoint_samples_like_its_fp32_original(tmp_path):
    sd = tiny_sd(1)
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "half.safetensors"))
    save_file({k: v.half().float() for k, v in sd.items()}, str(tmp_path / "full.safetensors"))
    a, _ = run_sample(tmp_path / "a.mp4", "--frames", "5", "--seed", "1", "--ckpt", str(tmp_path / "half.safetensors"))
    b, _ = run_sample(tmp_path / "b.mp4", "--frames", "5", "--seed", "1", "--ckpt", str(tmp_path / "full.safetensors"))
    assert torch.equal(a, b)


def test_a_non_finite_video_is_an_error_and_no_file(tmp_path, monkeypatch):
    real = wan.generate
    monkeypatch.setattr(wan, "generate", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit) as exit:
        run_sample(tmp_path / "v.mp4", "--frames", "5")
    assert "non-finite values" in str(exit.value.code) and "nothing written" in str(exit.value.code)
    assert os.listdir(tmp_path) == []


def test_the_settings_json_never_replaces_another_file(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    with pytest.raises(SystemExit) as exit:
        run_sample(tmp_path / "notes.mp4", "--frames", "5")
    assert "notes.json exists and is not a settings file of sample.py" in str(exit.value.code)
    assert notes.read_text() == '{"my": "notes"}' and sorted(os.listdir(tmp_path)) == ["notes.json"]
    # Its own settings file from an earlier run is replaced, as a re-run should.
    run_sample(tmp_path / "v.mp4", "--frames", "5", "--seed", "1")
    _, meta = run_sample(tmp_path / "v.mp4", "--frames", "5", "--seed", "2")
    assert meta["seed"] == 2 and meta["written_by"] == "sample.py"
