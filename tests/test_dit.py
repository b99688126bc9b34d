"""The DiT against diffusers' WanTransformer3DModel, the official key layout, LoRA and loading."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import wan

# A config small enough for CPU but with every feature of the real ones: head_dim 32 splits
# RoPE over (f, h, w) as [6, 5, 5] pairs, several heads, per-token and per-sample time.
SMALL = dict(dim=64, ffn_dim=96, freq_dim=32, text_dim=24, num_heads=2, num_layers=2, text_len=16)


@pytest.fixture(autouse=True)
def seeded():
    """Inputs drawn from torch's global generator do not depend on which tests ran before."""
    torch.manual_seed(0)


def small_config(model_type="ti2v"):
    if model_type == "ti2v":
        return wan.WanConfig(model_type="ti2v", in_dim=8, out_dim=8, **SMALL)
    return wan.WanConfig(model_type="i2v", in_dim=8 + 6, out_dim=8, **SMALL)


def randomized(model, seed=0):
    """Random values everywhere (the official init zeroes the head, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def to_diffusers(model):
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    cfg = model.cfg
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
        text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=cfg.eps)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref.load_state_dict(convert_wan_transformer_to_diffusers(sd), strict=True)
    return ref.eval()


def padded_contexts(cfg, lengths, seed=1):
    """A batch of prompts of different lengths, zero-padded to text_len as both models expect."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(len(lengths), cfg.text_len, cfg.text_dim)
    for i, n in enumerate(lengths):
        ctx[i, :n] = torch.randn(n, cfg.text_dim, generator=g)
    return ctx


@torch.no_grad()
def test_parity_with_diffusers_ti2v_per_token_time():
    cfg = small_config("ti2v")
    model = randomized(wan.WanModel(cfg)).eval()
    ref = to_diffusers(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_dim, 3, 6, 8, generator=g)
    L = 3 * 3 * 4
    t = torch.tensor([[0.0] * 12 + [937.5] * (L - 12), [0.0] * 12 + [250.0] * (L - 12)])  # first frame t=0
    ctx = padded_contexts(cfg, [5, 11])
    ours = model(x, t, ctx)
    theirs = ref(x, t, ctx, return_dict=False)[0]
    assert ours.shape == (2, cfg.out_dim, 3, 6, 8)
    assert (ours - theirs).abs().max().item() <= 1e-4


@torch.no_grad()
def test_parity_with_diffusers_i2v_condition_channels():
    cfg = small_config("i2v")
    model = randomized(wan.WanModel(cfg), seed=3).eval()
    ref = to_diffusers(model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 2, 4, 4, generator=g)
    y = torch.randn(2, 6, 2, 4, 4, generator=g)
    t = torch.tensor([999.0, 400.0])
    ctx = padded_contexts(cfg, [3, 16])
    ours = model(x, t, ctx, y=y)
    theirs = ref(torch.cat([x, y], 1), t, ctx, return_dict=False)[0]
    assert (ours - theirs).abs().max().item() <= 1e-4


@torch.no_grad()
def test_unpadded_list_context_equals_padded_tensor():
    cfg = small_config()
    model = randomized(wan.WanModel(cfg)).eval()
    ctx = padded_contexts(cfg, [4, 9])
    x, t = torch.randn(2, cfg.in_dim, 1, 4, 4), torch.tensor([500.0, 10.0])
    a = model(x, t, ctx)
    b = model(x, t, [ctx[0, :4], ctx[1, :9]])
    assert torch.equal(a, b)


def test_backward_with_per_token_time_repeats_exactly_on_two_threads():
    """A seeded CPU run must repeat itself bit for bit. Per-token time goes through the time MLPs
    once per distinct value and back to the tokens; indexing back would make backward add into
    the same rows from both threads in a varying order."""
    cfg = small_config()
    model = randomized(wan.WanModel(cfg))
    x, ctx = torch.randn(4, cfg.in_dim, 3, 16, 16), padded_contexts(cfg, [5, 7, 9, 11])
    t = torch.tensor([0.0] * 64 + [900.0] * 128).repeat(4, 1)
    t[2:, 64:] = 300.0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            model.zero_grad()
            model(x, t, ctx).square().mean().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.time_embedding.parameters()]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


@torch.no_grad()
def test_per_sample_time_equals_constant_per_token_time():
    cfg = small_config()
    model = randomized(wan.WanModel(cfg)).eval()
    x, ctx = torch.randn(1, cfg.in_dim, 2, 4, 4), padded_contexts(cfg, [6])
    a = model(x, torch.tensor([321.0]), ctx)
    b = model(x, torch.full((1, 2 * 2 * 2), 321.0), ctx)
    # Same math; float32 matmuls of different shapes round differently (~1 ulp of |v| ~ 3).
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def count(cfg):
    with torch.device("meta"):
        m = wan.WanModel(cfg)
    return len(m.state_dict()), sum(p.numel() for p in m.parameters())


def test_official_presets_have_official_key_and_parameter_counts():
    # Counted from the official WanModel code (FACTS.md): 825 keys / 4,999,787,712 for TI2V-5B,
    # 1095 keys / 14,288,901,184 for each A14B expert.
    assert count(wan.CONFIGS["5b"]) == (825, 4_999_787_712)
    assert count(wan.CONFIGS["a14b"]) == (1095, 14_288_901_184)


def test_official_key_names():
    keys = wan.WanModel(small_config()).state_dict().keys()
    for k in ["patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias",
              "time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight",
              "blocks.0.self_attn.q.weight", "blocks.0.self_attn.norm_q.weight", "blocks.1.cross_attn.norm_k.weight",
              "blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias",
              "blocks.0.modulation", "head.head.weight", "head.modulation"]:
        assert k in keys
    assert not any("norm1" in k or "norm2" in k for k in keys), "norm1/norm2 have no affine parameters"


def test_official_config_dict_is_accepted():
    # The official repo's config.json for TI2V-5B, including diffusers' bookkeeping keys.
    official = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": 3072, "eps": 1e-06,
                "ffn_dim": 14336, "freq_dim": 256, "in_dim": 48, "model_type": "ti2v", "num_heads": 24,
                "num_layers": 30, "out_dim": 48, "text_len": 512}
    cfg = wan.WanConfig.from_dict(official)
    assert count(cfg) == count(wan.CONFIGS["5b"])
    with pytest.raises(ValueError, match="unknown WanConfig fields"):
        wan.WanConfig.from_dict({"dim": 8, "hidden": 3})


def save_official_folder(model, folder, shards=2):
    """Sharded safetensors with an index, as the official Hugging Face repos store the DiT."""
    os.makedirs(folder, exist_ok=True)
    keys = list(model.state_dict())
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: model.state_dict()[k].contiguous() for k in keys[i::shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)


@torch.no_grad()
def test_load_official_sharded_folder_strict(tmp_path):
    cfg = small_config()
    model = randomized(wan.WanModel(cfg)).eval()
    save_official_folder(model, tmp_path / "ckpt")
    loaded = wan.load_dit(cfg, str(tmp_path / "ckpt"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x, t, ctx = torch.randn(1, cfg.in_dim, 1, 2, 2), torch.tensor([5.0]), padded_contexts(cfg, [3])
    # Identical weights; memory alignment of the loaded tensors can pick another SIMD path.
    assert torch.allclose(model(x, t, ctx), loaded(x, t, ctx), atol=1e-5)


def test_a14b_expert_subfolder_loads(tmp_path):
    cfg = small_config("i2v")
    high, low = randomized(wan.WanModel(cfg), 5), randomized(wan.WanModel(cfg), 6)
    save_official_folder(high, tmp_path / "high_noise_model")
    save_official_folder(low, tmp_path / "low_noise_model", shards=1)
    got = wan.load_dit(cfg, str(tmp_path), expert="low_noise_model")
    assert torch.equal(got.head.head.weight, low.head.head.weight)


def test_one_wrong_key_fails_naming_it(tmp_path):
    cfg = small_config()
    sd = wan.WanModel(cfg).state_dict()
    sd["blocks.1.self_attn.qq.weight"] = sd.pop("blocks.1.self_attn.q.weight")
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(KeyError, match=r"blocks\.1\.self_attn\.q\.weight.*blocks\.1\.self_attn\.qq\.weight"):
        wan.load_dit(cfg, str(tmp_path / "bad.safetensors"))


def test_wrong_shape_fails_naming_it(tmp_path):
    cfg = small_config()
    sd = wan.WanModel(cfg).state_dict()
    sd["head.modulation"] = torch.zeros(1, 3, cfg.dim)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="head.modulation"):
        wan.load_dit(cfg, str(tmp_path / "bad.safetensors"))


def test_missing_repo_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="Wan-AI/Wan2.2-TI2V-5B"):
        wan.load_dit(wan.CONFIGS["5b"], "Wan-AI/Wan2.2-TI2V-5B")


@pytest.mark.parametrize("bad, match", [
    (dict(ctx_width=23), "context width"),
    (dict(channels=7), "channels"),
    (dict(hw=(4, 5)), "not divisible by patch"),
    (dict(t_shape=(2, 3)), "per-token"),
    (dict(ctx_len=17), "text_len"),
])
def test_bad_input_is_a_clear_error(bad, match):
    cfg = small_config()
    model = wan.WanModel(cfg)
    h, w = bad.get("hw", (4, 4))
    x = torch.randn(2, bad.get("channels", cfg.in_dim), 1, h, w)
    t = torch.zeros(bad.get("t_shape", (2,)))
    ctx = torch.zeros(2, bad.get("ctx_len", 5), bad.get("ctx_width", cfg.text_dim))
    with pytest.raises(ValueError, match=match):
        model(x, t, ctx)


# -----------------------------------------------------------------------------
# LoRA


def random_lightning_lora(model, rank=4, seed=7):
    """A file in the Wan2.2-Lightning layout for every attention and FFN linear of the blocks."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and name.split(".", 2)[2] in wan.LORA_TARGETS:
            sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
            sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(8.0)
    return sd


@torch.no_grad()
def test_lightning_merge_equals_diffusers_lora_loader(tmp_path):
    pytest.importorskip("peft")
    from diffusers import WanPipeline
    cfg = small_config()
    model = randomized(wan.WanModel(cfg)).eval()
    ref = to_diffusers(model)
    lora = random_lightning_lora(model)
    save_file(lora, tmp_path / "lightning.safetensors")
    x = torch.randn(2, cfg.in_dim, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([900.0, 100.0])
    ctx = padded_contexts(cfg, [4, 7])
    ours_base, theirs_base = model(x, t, ctx), ref(x, t, ctx, return_dict=False)[0]
    # diffusers' own reading of the Lightning layout (its non-diffusers Wan LoRA converter).
    state = WanPipeline.lora_state_dict(str(tmp_path / "lightning.safetensors"))
    ref.load_lora_adapter(state, adapter_name="lightning", prefix="transformer")
    ref.fuse_lora(lora_scale=1.0)
    wan.merge_lora(model, lora)
    ours, theirs = model(x, t, ctx), ref(x, t, ctx, return_dict=False)[0]
    # What the merge changes, on both sides: the base models' own difference (up to ~7e-5 here,
    # float64 RoPE as the official code) is the parity test's business, not this one's.
    effect = theirs - theirs_base
    assert effect.abs().max() > 1.0                                            # the LoRA does something
    assert ((ours - ours_base) - effect).abs().max().item() <= 1e-4            # measured: 2e-5


@torch.no_grad()
def test_fresh_lora_changes_nothing_and_can_be_switched_off():
    cfg = small_config()
    model = randomized(wan.WanModel(cfg)).eval()
    x, t, ctx = torch.randn(1, cfg.in_dim, 1, 4, 4), torch.tensor([500.0]), padded_contexts(cfg, [5])
    before = model(x, t, ctx)
    wan.add_lora(model, rank=4)
    assert torch.equal(model(x, t, ctx), before)
    for m in model.modules():
        if isinstance(m, wan.LoRALinear):
            torch.nn.init.normal_(m.lora_up.weight)
    changed = model(x, t, ctx)
    assert (changed - before).abs().max() > 1e-3
    with wan.lora_disabled(model):
        assert torch.equal(model(x, t, ctx), before)
    assert torch.equal(model(x, t, ctx), changed)


@torch.no_grad()
def test_saved_lora_round_trips_through_merge_and_load(tmp_path):
    cfg = small_config()
    base = randomized(wan.WanModel(cfg)).eval()
    tuned = wan.add_lora(randomized(wan.WanModel(cfg)).eval(), rank=4, alpha=2.0)
    for m in tuned.modules():
        if isinstance(m, wan.LoRALinear):
            torch.nn.init.normal_(m.lora_up.weight, std=0.1)
    sd = wan.lora_state_dict(tuned)
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    save_file(sd, tmp_path / "ours.safetensors")
    x, t, ctx = torch.randn(1, cfg.in_dim, 1, 4, 4), torch.tensor([500.0]), padded_contexts(cfg, [5])
    want = tuned(x, t, ctx)
    merged = wan.merge_lora(randomized(wan.WanModel(cfg)).eval(), wan.read_state_dict(str(tmp_path / "ours.safetensors")))
    assert (merged(x, t, ctx) - want).abs().max() <= 1e-4
    reloaded = wan.load_lora_into(wan.add_lora(randomized(wan.WanModel(cfg)).eval(), rank=4), sd)
    assert torch.equal(reloaded(x, t, ctx), want)
    with pytest.raises(ValueError, match="rank"):
        wan.load_lora_into(wan.add_lora(wan.WanModel(cfg), rank=8), sd)
    del base


def test_lora_gradients_reach_only_adapters():
    cfg = small_config()
    model = wan.add_lora(randomized(wan.WanModel(cfg)), rank=4)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    x, t, ctx = torch.randn(1, cfg.in_dim, 1, 4, 4), torch.tensor([500.0]), padded_contexts(cfg, [5])
    model(x, t, ctx).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # up starts at zero, so the first gradient lands on up (down's is zero by construction).
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_up" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = small_config()
    model = randomized(wan.WanModel(cfg))
    x, t, ctx = torch.randn(1, cfg.in_dim, 2, 4, 4), torch.tensor([500.0]), padded_contexts(cfg, [5])
    model(x, t, ctx).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(x, t, ctx).square().sum().backward()
    for a, b in zip(want, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
