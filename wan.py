"""Wan2.2 in one file: config presets, the diffusion transformer (DiT), LoRA, loading.

Later sections of this file hold the VAEs (Wan2.2 and Wan2.1), the umT5 text encoder, the
flow-matching schedule and solvers, and the image-to-video sampling loop.

Official code: https://github.com/Wan-Video/Wan2.2 (wan/modules/model.py). Parameter names
match the released checkpoints, so `load_state_dict(official, strict=True)` needs no renaming.

Conventions used everywhere in this file:
  * video tensors are (B, C, F, H, W); pixels are in [-1, 1];
  * time runs from t=1 (pure noise) to t=0 (data); the DiT sees t*1000 (the official
    "timestep"), the flow-matching sigma is t itself: x_t = (1 - sigma) * x_0 + sigma * noise,
    and the model predicts the velocity v = noise - x_0.
"""
import functools
import hashlib
import html
import json
import math
import os
import sys
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

# imageio-ffmpeg starts every ffmpeg with a preexec_fn (to keep Ctrl-C from it), which makes Python
# copy this whole process at each start instead of vfork: ~40 ms per mp4 once torch is loaded, a
# minute of the demo's 12. Without it, Ctrl-C also stops ffmpeg, which is what a user wants here.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")

# -----------------------------------------------------------------------------
# Config presets


@dataclass
class WanConfig:
    # The official WanModel constructor arguments (wan/modules/model.py), same names.
    model_type: str = "ti2v"          # "ti2v" (TI2V-5B) or "i2v" (I2V-A14B experts)
    patch_size: tuple = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 48
    dim: int = 3072
    ffn_dim: int = 14336
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 48
    num_heads: int = 24
    num_layers: int = 30
    window_size: tuple = (-1, -1)     # accepted for compatibility; only (-1, -1) (global) is used
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # Ours: everything else a preset needs.
    name: str = "5b"
    repo: str = "Wan-AI/Wan2.2-TI2V-5B"   # Hugging Face repo with the official weights
    experts: tuple = ()               # A14B: subfolders (high noise, low noise); () = one model
    boundary: float = 0.0             # A14B: high-noise expert while t >= boundary (t in [0, 1])
    vae: str = "2.2"                  # "2.2" (z 48, stride 4x16x16) or "2.1" (z 16, stride 4x8x8)
    vae_kwargs: dict = field(default_factory=dict)   # overrides of the VAE constructor (tiny)
    t5_kwargs: dict = field(default_factory=dict)    # overrides of the T5 constructor (tiny)
    vae_stride: tuple = (4, 16, 16)
    sample_steps: int = 50
    sample_shift: float = 5.0
    sample_guide_scale: float = 5.0
    sample_fps: int = 24
    frame_num: int = 121
    size: tuple = (704, 1280)         # default (height, width)

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.window_size = tuple(self.window_size)
        self.experts = tuple(self.experts)
        self.vae_stride = tuple(self.vae_stride)
        self.size = tuple(self.size)

    @classmethod
    def from_dict(cls, d, **overrides):
        """An official `config.json` (keys starting with "_" are diffusers bookkeeping) or ours."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WanConfig fields {unknown}")
        return cls(**{**d, **overrides})


CONFIGS = {
    # TI2V-5B: the Wan2.2 VAE's first latent frame carries the image; per-token timesteps.
    "5b": WanConfig(),
    # I2V-A14B: two experts of this shape (high noise, low noise), image channels in y.
    "a14b": WanConfig(
        model_type="i2v", in_dim=36, dim=5120, ffn_dim=13824, out_dim=16, num_heads=40,
        num_layers=40, name="a14b", repo="Wan-AI/Wan2.2-I2V-A14B",
        experts=("high_noise_model", "low_noise_model"), boundary=0.9, vae="2.1",
        vae_stride=(4, 8, 8), sample_steps=40, sample_guide_scale=3.5, sample_fps=16,
        frame_num=81, size=(480, 832)),
    # The demo's model: the TI2V layout (first latent frame = the image, per-token t) at CPU size.
    # Its VAE is the Wan2.1 class with two levels (stride 4x4x4): a 64x64 face keeps its identity
    # through it, which the full 16x spatial compression of the 2.2 VAE at this size does not.
    "tiny": WanConfig(
        in_dim=16, dim=128, ffn_dim=512, freq_dim=64, text_dim=32, out_dim=16, num_heads=4,
        num_layers=4, text_len=96, name="tiny", repo="", vae="2.1", vae_stride=(4, 4, 4),
        vae_kwargs=dict(dim=16, z_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True)),
        t5_kwargs=dict(vocab=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2,
                       num_buckets=8),
        sample_steps=8, sample_guide_scale=1.0, sample_fps=8, frame_num=9, size=(64, 64)),
}


def get_config(name, **overrides):
    if name not in CONFIGS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


# -----------------------------------------------------------------------------
# DiT math helpers


def sinusoid(dim, t):
    """Timestep embedding as the official code computes it: float64, cos half then sin half."""
    half = dim // 2
    t = t.double()
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t[..., None] * freqs
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


def rope_table(grid, head_dim, device, theta=10000.0):
    """3-D RoPE rotations for a (f, h, w) token grid: complex, shape (L, head_dim // 2).

    The head's complex pairs are split over frame, height and width as the official code does
    ([22, 21, 21] pairs for head_dim 128). Angles are computed in float64 like the official
    code; the rotation is applied in complex64 (official: complex128), an ~1 ulp difference.
    """
    c = head_dim // 2
    splits = (c - 2 * (c // 3), c // 3, c // 3)
    angles = []
    for n, pairs, axis in zip(grid, splits, range(3)):
        inv = 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=device)
                              / (2 * pairs))
        a = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv  # (n, pairs)
        shape = [1, 1, 1, pairs]
        shape[axis] = n
        angles.append(a.view(shape).expand(*grid, pairs))
    angle = torch.cat(angles, dim=-1).reshape(-1, c)  # (f*h*w, c)
    return torch.polar(torch.ones_like(angle), angle).to(torch.complex64)


def rope_apply(x, rope):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, L, heads, head_dim) by the table angles."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, heads, head_dim // 2)
    return torch.view_as_real(xc * rope[None, :, None, :]).flatten(-2).type_as(x)


def no_autocast(device):
    if device.type == "meta":  # shape/FLOP counting (train.py --dry-run) has no autocast
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# -----------------------------------------------------------------------------
# DiT modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input and weight dtypes, as the official WanLayerNorm
    (there CUDA autocast upcasts a bf16 weight; CPU autocast does not, so it is done here)."""

    def forward(self, x):
        w, b = self.weight, self.bias
        w, b = (None, None) if w is None else (w.float(), b.float())
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class Attention(nn.Module):
    """Self- (RoPE) or cross-attention; q and k are RMS-normalised over the whole dim."""

    def __init__(self, dim, num_heads, qk_norm=True, eps=1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x, context=None, rope=None):
        ctx = x if context is None else context
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))    # (B, L, heads, d)
        k = self.norm_k(self.k(ctx)).unflatten(-1, (self.num_heads, -1))  # (B, Lc, heads, d)
        v = self.v(ctx).unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = rope_apply(q, rope), rope_apply(k, rope)
        # Official code upcasts q, k to float32 after RoPE; keep v's dtype for the kernel.
        q, k = q.to(v.dtype), k.to(v.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).flatten(2))  # (B, L, dim)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        # Learned offsets added to the time projection: shift/scale/gate for attention and FFN.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e0, context, rope):
        # x (B, L, dim) float32 residual stream; e0: six (B, L or 1, dim) float32 tensors, kept
        # apart so backward adds each term's gradient in place (one (6, B, L, dim) tensor would be
        # split here and its gradient stacked into a fresh copy in every block).
        with no_autocast(x.device):
            shift1, scale1, gate1, shift2, scale2, gate2 = (m + e for m, e in zip(self.modulation[0], e0))
        x = x + self.self_attn(self.norm1(x) * (1 + scale1) + shift1, rope=rope) * gate1
        x = x + self.cross_attn(self.norm3(x), context=context)  # ungated, as in the official code
        x = x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2
        return x


class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        with no_autocast(x.device):  # the official head runs in float32
            shift, scale = (m + e for m in self.modulation[0])               # (B, L or 1, dim) each
            return self.head(self.norm(x) * (1 + scale) + shift)


class WanModel(nn.Module):
    """The Wan2.2 DiT. forward(x, t, context, y=None) -> velocity (B, out_dim, F, H, W).

    x: (B, C, F, H, W) noisy latent; t: (B,) or per-token (B, L) timesteps in [0, 1000];
    context: (B, L_text, text_dim), zero-padded (the official model pads to text_len and
    attends to the padding, no mask) or a list of (L_i, text_dim); y: I2V-A14B condition
    channels, concatenated to x.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        assert cfg.dim % cfg.num_heads == 0 and (cfg.dim // cfg.num_heads) % 2 == 0
        # Kernel == stride, so this Conv3d is a linear map on patches; kept for the key name.
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = False
        self.init_weights()

    def init_weights(self):
        """The official initialisation; the head starts at zero so a new model predicts v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def check_inputs(self, x, t, context, y):
        cfg, (pt, ph, pw) = self.cfg, self.cfg.patch_size
        if x.ndim != 5:
            raise ValueError(f"x must be (B, C, F, H, W), got shape {tuple(x.shape)}")
        c = x.shape[1] + (0 if y is None else y.shape[1])
        if c != cfg.in_dim:
            extra = "" if y is None else f" ({x.shape[1]} in x + {y.shape[1]} in y)"
            raise ValueError(f"latent has {c} channels{extra}, the model expects in_dim={cfg.in_dim}")
        if y is not None and y.shape[2:] != x.shape[2:]:
            raise ValueError(f"y {tuple(y.shape)} does not match x {tuple(x.shape)} in (F, H, W)")
        f, h, w = x.shape[2:]
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent (F, H, W)=({f}, {h}, {w}) is not divisible by patch {cfg.patch_size}")
        L = (f // pt) * (h // ph) * (w // pw)
        if t.shape not in ((x.shape[0],), (x.shape[0], L)):
            raise ValueError(f"t must be ({x.shape[0]},) or per-token ({x.shape[0]}, {L}), got {tuple(t.shape)}")
        width = context.shape[-1] if torch.is_tensor(context) else context[0].shape[-1]
        if width != cfg.text_dim:
            raise ValueError(f"context width {width} != text_dim {cfg.text_dim}")
        n = context.shape[1] if torch.is_tensor(context) else max(len(c) for c in context)
        if n > cfg.text_len:
            raise ValueError(f"context has {n} tokens, more than text_len={cfg.text_len}")

    def forward(self, x, t, context, y=None):
        cfg = self.cfg
        self.check_inputs(x, t, context, y)
        if y is not None:
            x = torch.cat([x, y], dim=1)
        B, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)

        # Patchify: (B, C, F, H, W) -> (B, L, C*pt*ph*pw), the Conv3d weight's flattening order.
        x = x.unflatten(2, (grid[0], pt)).unflatten(4, (grid[1], ph)).unflatten(6, (grid[2], pw))
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4).flatten(1, 3)  # (B, L, C*pt*ph*pw)
        wt = self.patch_embedding.weight.flatten(1)
        x = F.linear(x.to(wt.dtype), wt, self.patch_embedding.bias).float()  # (B, L, dim)

        # Time: one embedding per sample (t (B,)) or per token (t (B, L)); float32, no autocast.
        with no_autocast(x.device):
            tt = t if t.ndim == 2 else t[:, None]                            # (B, 1 or L)
            # Per-token t takes a few values (TI2V: 0 on the first frame, t elsewhere): on the CPU each
            # value goes through the time MLPs once (at CPU sizes they are ~7% of the DiT's work). Not
            # on a GPU: torch.unique would wait for the device, and at 5B the MLPs are ~1% of the work.
            index = None
            if tt.shape[1] > 1 and tt.device.type == "cpu":
                tt, index = torch.unique(tt, return_inverse=True)            # (U,), (B, L)
            e = self.time_embedding(sinusoid(cfg.freq_dim, tt).float())      # (B, 1 or L, dim) or (U, dim)
            e0 = self.time_projection(e).unflatten(-1, (6, cfg.dim)).movedim(-2, 0)  # (6, B, 1 or L, dim) / (6, U, dim)
            if index is not None:
                # Back to tokens by a one-hot matmul, not e[index]: the same values, but indexing's
                # backward adds into shared rows from several threads, in an order that changes run
                # to run, and a seeded CPU run would not repeat itself.
                pick = F.one_hot(index, tt.shape[0]).to(e.dtype)              # (B, L, U)
                e, e0 = pick @ e, pick @ e0[:, None]                          # (B, L, dim), (6, B, L, dim)
            e0 = e0.contiguous().unbind(0)                                   # 6 x (B, 1 or L, dim)

        # Text: pad to text_len with zeros before embedding; padded rows are attended.
        if not torch.is_tensor(context):
            context = nn.utils.rnn.pad_sequence(list(context), batch_first=True)
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))  # (B, text_len, dim)

        rope = rope_table(grid, cfg.dim // cfg.num_heads, x.device)
        # Checkpoint only when a weight can get a gradient: under detached_forward() (detached weights
        # through functional_call) backward would recompute with the real, trainable weights, save
        # other tensors than the forward did, and fail.
        checkpoint = self.gradient_checkpointing and torch.is_grad_enabled() and \
            any(p.requires_grad for p in self.blocks.parameters())
        for block in self.blocks:
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(block, x, e0, context, rope, use_reentrant=False)
            else:
                x = block(x, e0, context, rope)
        x = self.head(x, e)                                                  # (B, L, out*pt*ph*pw)

        # Unpatchify: (B, L, pt*ph*pw*C) -> (B, C, F, H, W), channel last in the head's layout.
        x = x.view(B, *grid, pt, ph, pw, cfg.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                                # (B, C, f, pt, h, ph, w, pw)
        return x.reshape(B, cfg.out_dim, f, h, w).float()


# Parameters the official code keeps in float32 and runs outside autocast, whatever the dtype of
# the rest: the time embedding and projection, every modulation table, and the head.
FP32_PARAMS = ("time_embedding.", "time_projection.", "head.")


def keeps_fp32(name):
    return name.startswith(FP32_PARAMS) or name.endswith("modulation")


def cast_dit(model, dtype):
    """model in `dtype` (e.g. bf16 frozen weights), except the parameters of FP32_PARAMS and the
    modulation tables, which stay float32 as the official code runs them. In place; returns model."""
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model


# -----------------------------------------------------------------------------
# LoRA: a trainable low-rank adapter on the DiT's linear layers, and the Lightning format


class LoRALinear(nn.Linear):
    """nn.Linear plus W' = W + (alpha / rank) * up @ down. Base keys (weight, bias) unchanged.

    `up` starts at zero, so a fresh adapter leaves the model's output exactly as it was.
    """

    def __init__(self, in_features, out_features, bias=True, rank=32, alpha=32.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.lora_down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.rank, self.alpha, self.lora_enabled = rank, float(alpha), True

    def reset_lora(self):
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        out = super().forward(x)
        if self.lora_enabled:
            out = out + self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))).to(out.dtype) * (self.alpha / self.rank)
        return out


# The paper's authors adapt these (ROLL reward_fl: q, k, v, o, ffn.0, ffn.2 of every block).
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def add_lora(model, rank=32, alpha=None, targets=LORA_TARGETS, dtype=torch.float32):
    """Swap the targeted nn.Linear layers of every block for LoRALinear, in place."""
    alpha = rank if alpha is None else alpha
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            continue
        if not (name.startswith("blocks.") and name.split(".", 2)[2] in targets):
            continue
        lora = LoRALinear(module.in_features, module.out_features, module.bias is not None, rank, alpha,
                          device=module.weight.device, dtype=dtype)
        lora.weight, lora.bias = module.weight, module.bias  # share, do not copy, the base weights
        lora.reset_lora()
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, lora)
    return model


@contextmanager
def lora_disabled(model):
    """The reference model of the KL term: the same weights with every adapter switched off."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.lora_enabled = True


def lora_state_dict(model, prefix="diffusion_model."):
    """Adapters in the Wan2.2-Lightning layout: <prefix><param>.lora_down.weight / .lora_up.weight / .alpha."""
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{prefix}{name}.lora_down.weight"] = m.lora_down.weight.detach().clone()
            sd[f"{prefix}{name}.lora_up.weight"] = m.lora_up.weight.detach().clone()
            sd[f"{prefix}{name}.alpha"] = torch.tensor(m.alpha)
    return sd


def split_lora(sd):
    """Group a Lightning-format file by target: {module name: {"down", "up", "alpha", "diff", "diff_b"}}."""
    groups = {}
    for key, value in sd.items():
        name = key.removeprefix("diffusion_model.")
        for suffix, part in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
                             (".diff_b", "diff_b"), (".diff", "diff")):
            if name.endswith(suffix):
                groups.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            raise KeyError(f"LoRA key {key!r} is not of the form <param>.lora_down.weight/.lora_up.weight/.alpha")
    return groups


def lora_module(model, name, g, what):
    """The layer a LoRA group adapts, after checking the group fits it; ValueError naming the file
    (`what`) and the module otherwise."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{what}: {name} is not a layer of the model (an unknown module)") from None
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{what}: {name} is a {type(module).__name__}, not a linear layer a LoRA can adapt")
    if ("down" in g) != ("up" in g):
        raise ValueError(f"{what}: {name} has lora_{'down' if 'down' in g else 'up'} without "
                         f"lora_{'up' if 'down' in g else 'down'}")
    out_f, in_f = module.weight.shape
    if "down" in g:
        down, up = g["down"].flatten(1), g["up"].flatten(1)
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_f or up.shape[0] != out_f:
            raise ValueError(f"{what}: {name} has lora_down {tuple(g['down'].shape)} and lora_up "
                             f"{tuple(g['up'].shape)}; the layer is {out_f}x{in_f} (out x in)")
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"{what}: {name} has lora_down of rank {down.shape[0]} but lora_up of rank "
                             f"{up.shape[1]}")
    for part, shape in (("diff", (out_f, in_f)), ("diff_b", (out_f,))):
        if part in g and tuple(g[part].shape) != shape:
            raise ValueError(f"{what}: {name}.{part} has shape {tuple(g[part].shape)}, the layer needs {shape}")
    return module


@torch.no_grad()
def merge_lora(model, sd, scale=1.0, what="LoRA"):
    """Fold a Lightning-format LoRA into the weights: W += scale * alpha/rank * up @ down (float32)."""
    for name, g in split_lora(sd).items():
        module = lora_module(model, name, g, what)
        if "down" in g:
            down, up = g["down"].float(), g["up"].float()
            alpha = float(g["alpha"]) if "alpha" in g else down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0]) * scale
            module.weight.copy_((module.weight.float() + delta.view_as(module.weight)).to(module.weight.dtype))
        if "diff" in g:
            module.weight.copy_((module.weight.float() + scale * g["diff"].float()).to(module.weight.dtype))
        if "diff_b" in g:
            module.bias.copy_((module.bias.float() + scale * g["diff_b"].float()).to(module.bias.dtype))
    return model


def load_lora_into(model, sd, what="LoRA"):
    """Load a Lightning-format LoRA into a model that has adapters (add_lora) of the same rank."""
    for name, g in split_lora(sd).items():
        m = lora_module(model, name, g, what)
        if not isinstance(m, LoRALinear):
            raise KeyError(f"{what}: {name} has no adapter; call add_lora with matching targets first")
        if "down" not in g:
            raise ValueError(f"{what}: {name} has no lora_down/lora_up pair to load into the adapter")
        if g["down"].shape != m.lora_down.weight.shape:
            raise ValueError(f"{what}: {name}: LoRA rank {g['down'].shape[0]} != model adapter rank {m.rank}")
        with torch.no_grad():
            m.lora_down.weight.copy_(g["down"])
            m.lora_up.weight.copy_(g["up"])
        m.alpha = float(g.get("alpha", m.rank))
    return model


# -----------------------------------------------------------------------------
# Loading official checkpoints: local folder or Hugging Face repo, meta device, strict


def resolve(src, patterns):
    """A local folder, or a Hugging Face repo id downloaded (only `patterns`) to the HF cache."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise ValueError(f"{src} is a file; expected a folder or a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id=src, allow_patterns=list(patterns))
    except Exception as err:
        from huggingface_hub.constants import HF_HUB_CACHE
        raise FileNotFoundError(
            f"could not get {list(patterns)} of {src!r}: not a local folder, and the Hugging Face hub "
            f"gave no copy (looked in {HF_HUB_CACHE}; offline={os.environ.get('HF_HUB_OFFLINE', '0')}). "
            f"Download it first (hf download {src}) or pass the local folder. ({type(err).__name__}: {err})"
        ) from None


def check_device(name):
    """torch.device(name) (None stays None), or ValueError when this machine cannot run on it."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def read_state_dict(path):
    """safetensors file, sharded safetensors folder (with its index), or an official .pth.
    A file that is not one of them (text, cut short, pickled objects) is a ValueError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights {path} do not exist")
    try:
        sd = _read_state_dict(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            raise ValueError(f"weights {path}: the file holds pickled Python objects that torch.load(weights_only=True) "
                             f"will not run; save a plain state dict of tensors (or .safetensors)") from None
        raise ValueError(f"weights {path}: not a readable {os.path.splitext(path)[1] or 'weights'} file, "
                         f"corrupt or cut short? ({type(err).__name__}: {first})") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"weights {path}: expected a flat dict of tensors (a state dict), found "
                         f"{type(sd).__name__} {sorted(sd)[:4] if isinstance(sd, dict) else ''}")
    return sd


def _read_state_dict(path):
    from safetensors.torch import load_file
    if os.path.isdir(path):
        index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
        if index:
            with open(os.path.join(path, index[0])) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        else:
            shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not shards:
            raise FileNotFoundError(f"no .safetensors weights in {path}")
        sd = {}
        for s in shards:
            sd.update(load_file(os.path.join(path, s)))
        return sd
    if path.endswith(".safetensors"):
        return load_file(path)
    if path.endswith((".pth", ".pt", ".bin")):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    raise ValueError(f"do not know how to read weights from {path}")


def load_strict(model, sd, what):
    """assign=True onto a meta-built model; a missing or unexpected key is named, never skipped."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise KeyError(f"{what}: keys do not match the model: missing {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                       f"{' ...' if len(unexpected) > 8 else ''}")
    for k, v in expected.items():
        if v.shape != sd[k].shape:
            raise ValueError(f"{what}: {k} has shape {tuple(sd[k].shape)}, the model expects {tuple(v.shape)}")
    if not any(v.is_meta for v in expected.values()):
        # Into a built model (fine-tuned weights over the base): keep its dtype, e.g. fp16 into fp32
        # weights, which would otherwise leave the model half in one dtype and fail at the first matmul.
        sd = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def load_dit(cfg, src, expert=None, dtype=torch.float32, device="cpu"):
    """Build WanModel(cfg) on the meta device and fill it from an official folder/repo or our file.

    src: a Hugging Face repo id or local folder in the official layout (A14B: pass `expert`,
    one of cfg.experts), or a single .safetensors file with official key names (ours).
    """
    if os.path.isfile(src):
        path = src
    else:
        sub = f"{expert}/" if expert else ""
        path = os.path.join(resolve(src, [f"{sub}diffusion_pytorch_model*", f"{sub}config.json"]), sub)
    with torch.device("meta"):
        model = WanModel(cfg)
    load_strict(model, read_state_dict(path), f"DiT weights {path}")
    return cast_dit(model, dtype).to(device)


# Safetensors metadata key of our checkpoints: the LoRA files merged into the base they were trained
# from (JSON list of {file, sha256, expert}). A full checkpoint holds them inside its weights.
MERGED_LORAS = "merged_loras"


def split_lora_spec(spec):
    """"high=FILE" / "low=FILE" / "FILE" (= the last, low-noise expert) -> (expert, path)."""
    return spec.split("=", 1) if spec.startswith(("high=", "low=")) else ("low", spec)


@functools.lru_cache(maxsize=16)
def _sha256(path, size, mtime):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path):
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)  # a rewritten file is hashed again


def merged_loras(ckpt=None, loras=()):
    """What a model built by load_experts(cfg, src, ckpt, loras) has merged into its base: the records
    of `ckpt` for the expert it holds (when it holds full weights: the last, "low") followed by one
    {file, sha256, expert} per LoRA spec."""
    done = []
    if ckpt and ckpt.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(ckpt, framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != "lightning-lora":
            done = [r for r in json.loads(meta.get(MERGED_LORAS, "[]")) if r["expert"] == "low"]
    for spec in loras:
        which, path = split_lora_spec(spec)
        done.append(dict(file=os.path.basename(path), sha256=file_sha256(path), expert=which))
    return done


def load_experts(cfg, src, ckpt=None, loras=(), device="cpu", dtype=torch.float32, last_dtype=None):
    """The DiT (or I2V-A14B's two experts, high noise first) ready to sample: official weights from
    `src` (folder or repo; None = random weights, for the tiny preset), then `ckpt` (our fine-tuned
    weights with official names, or a LoRA) into the last (low-noise) expert, then `loras`
    ("high=FILE", "low=FILE" or "FILE" = the last expert) merged. Frozen, eval mode.
    Weights are cast (cast_dit: the float32 parts stay float32) to `dtype` (the last expert to
    `last_dtype`, default `dtype`) on the CPU, before the merges and before they reach `device`:
    A14B's two experts in float32 would need 114 GB.
    A LoRA that the checkpoint's metadata (MERGED_LORAS) says is already inside its weights is refused:
    merging it again would add the same update twice."""
    experts = []
    names = cfg.experts or (None,)
    dtypes = [dtype] * (len(names) - 1) + [dtype if last_dtype is None else last_dtype]
    for expert, want in zip(names, dtypes):
        if src:
            experts.append(load_dit(cfg, src, expert=expert, dtype=want))
        else:
            torch.manual_seed(0)
            experts.append(cast_dit(WanModel(cfg), want))
    if ckpt:
        sd = read_state_dict(ckpt)
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"fine-tuned weights {ckpt}: non-finite values (NaN or inf) in {len(bad)} "
                             f"tensor(s), e.g. {bad[0]}; the run that wrote them diverged")
        if any(".lora_down." in k or ".lora_up." in k for k in sd):
            merge_lora(experts[-1], sd, what=f"LoRA {ckpt}")
        else:
            load_strict(experts[-1], sd, f"fine-tuned weights {ckpt}")
    inside = {(r["expert"], r["sha256"]): r["file"] for r in merged_loras(ckpt)} if ckpt else {}
    for lora in loras:
        which, path = split_lora_spec(lora)
        if inside and (which, file_sha256(path)) in inside:
            raise ValueError(f"LoRA {path}: {ckpt} already has it merged into its weights (its metadata records "
                             f"{inside[which, file_sha256(path)]} with the same sha256); leave out --lora {lora}")
        if which == "high" and len(experts) < 2:
            raise ValueError(f"LoRA {lora}: {cfg.name} has one model, no high-noise expert")
        merge_lora(experts[0 if which == "high" else -1], read_state_dict(path), what=f"LoRA {path}")
    return [m.to(device).eval().requires_grad_(False) for m in experts]   # load_strict kept each dtype

# -----------------------------------------------------------------------------
# VAEs (Wan2.2 and Wan2.1): causal 3-D conv autoencoders, run chunk by chunk
#
# Official code: wan/modules/vae2_2.py and vae2_1.py. A video of F = 4n+1 frames is encoded in
# chunks of 1, 4, 4, ... frames and a latent is decoded one latent frame at a time. Every
# temporal conv carries the last CACHE_T frames it saw into the next chunk, so the result is a
# causal convolution over the whole clip while only one chunk's activations exist at a time.

CACHE_T = 2  # frames of history a causal kernel-3 conv needs from the previous chunk

# Latent statistics of the released VAEs, from the official wrappers Wan2_2_VAE / Wan2_1_VAE
# (they are not in the .pth files). encode() returns (mu - mean) / std.
WAN22_LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class Cache:
    """Frames that causal layers carry from one chunk to the next, keyed by layer.

    Layers read `prev` (left by the previous chunk) and write `next`; nothing is changed in
    place, so a checkpointed chunk that is recomputed during backward reads the same frames.
    """

    def __init__(self, prev=None):
        self.first = prev is None  # the first chunk holds one frame and skips temporal resampling
        self.prev = prev or {}
        self.next = {}


class CausalConv3d(nn.Conv3d):
    """Conv3d whose output frame t sees input frames t-2..t only (kernel 3 in time).

    The two frames before a chunk are the previous chunk's last frames, or zeros at the start.
    Space is zero-padded by the conv itself (official: F.pad then an unpadded conv; same numbers,
    one copy less).
    """

    def __init__(self, in_dim, out_dim, kernel=(3, 3, 3)):
        super().__init__(in_dim, out_dim, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))

    def forward(self, x, cache):
        prev = cache.prev.get(self)
        if prev is not None:
            x = torch.cat([prev, x], dim=2)
        cache.next[self] = x[:, :, -CACHE_T:].clone()  # clone: a slice would keep all of x alive
        missing = self.kernel_size[0] - 1 - (0 if prev is None else prev.shape[2])
        if missing:
            x = F.pad(x, (0, 0, 0, 0, missing, 0))
        return conv3d(self, x)


def conv3d(conv, x):
    """conv(x), on CPU in float32 always through oneDNN. PyTorch's heuristic sends conv3d inputs
    with N*C*T*H <= 20480 (every chunk at the latent-side levels) to an im2col kernel that is
    2-3x slower there; the numbers are the same up to float rounding."""
    on_cpu_fp32 = x.device.type == "cpu" and x.dtype == conv.weight.dtype == torch.float32
    if on_cpu_fp32 and torch.backends.mkldnn.is_available():
        return torch.ops.aten.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride,
                                                 conv.dilation, conv.groups)
    return F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class ChannelRMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (the official RMS_norm, without its unused bias)."""

    def __init__(self, dim, video=True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * (self.gamma * self.scale)


# Layers that need no cache; every other VAE layer is called as layer(x, cache).
STATELESS = (ChannelRMSNorm, nn.SiLU, nn.Dropout)


def apply_layers(layers, x, cache):
    for layer in layers:
        x = layer(x) if isinstance(layer, STATELESS) else layer(x, cache)
    return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim, dropout=0.0):
        super().__init__()
        # nn.Sequential so the keys are the official residual.{0,2,3,6}.
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim),
            ChannelRMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim))
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache):
        return apply_layers(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame; frames do not attend to each other."""

    def __init__(self, dim):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # official init: a new block adds (almost) nothing

    def forward(self, x, cache=None):
        B, C, T, H, W = x.shape
        h = self.norm(x.transpose(1, 2).flatten(0, 1))                            # (B*T, C, H, W)
        q, k, v = self.to_qkv(h).flatten(2).transpose(1, 2).chunk(3, dim=-1)      # each (B*T, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(h.transpose(1, 2).unflatten(2, (H, W)))                     # (B*T, C, H, W)
        return x + h.unflatten(0, (B, T)).transpose(1, 2)                         # (B, C, T, H, W)


class Resample(nn.Module):
    """2x down- or up-sampling in space (per frame), and in time for the "3d" modes.

    Time, as the official code does it: downsample3d passes the first chunk's single frame
    through and afterwards convolves (stride 2) each chunk with the previous chunk's last frame;
    upsample3d keeps the first chunk's frame single (the official "Rep" sentinel) and afterwards
    turns every frame into two with a causal conv whose history starts as zeros, which is what
    the official code does on the chunk after "Rep".
    """

    def __init__(self, dim, mode, up_dim=None):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, up_dim, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):
        if self.mode == "upsample3d" and not cache.first:
            B, C, T, H, W = x.shape
            x = self.time_conv(x, cache).view(B, 2, C, T, H, W)
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(B, C, T * 2, H, W)   # frame t -> (2t, 2t+1)
        B, T = x.shape[0], x.shape[2]
        x = self.resample(x.transpose(1, 2).flatten(0, 1))              # (B*T, C', H', W')
        x = x.unflatten(0, (B, T)).transpose(1, 2)                       # (B, C', T, H', W')
        if self.mode == "downsample3d":
            last = x[:, :, -1:].clone()
            if not cache.first:
                x = self.time_conv(torch.cat([cache.prev[self], x], dim=2))
            cache.next[self] = last
        return x


def patchify(x, p):
    """(B, C, F, H, W) -> (B, C*p*p, F, H/p, W/p); channels ordered (c, w offset, h offset) as official."""
    if p == 1:
        return x
    B, C, f, H, W = x.shape
    x = x.view(B, C, f, H // p, p, W // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # (B, C, pw, ph, F, H/p, W/p)
    return x.reshape(B, C * p * p, f, H // p, W // p)


def unpatchify(x, p):
    if p == 1:
        return x
    B, C, f, H, W = x.shape
    x = x.view(B, C // (p * p), p, p, f, H, W).permute(0, 1, 4, 5, 3, 6, 2)  # (B, C, F, H, ph, W, pw)
    return x.reshape(B, C // (p * p), f, H * p, W * p)


def fold(x, ft, fs):
    """(B, C, T, H, W) -> (B, C*ft*fs*fs, T/ft, H/fs, W/fs): sub-grid offsets become channels.

    Time is zero-padded at the front to a multiple of ft first (official AvgDown3D).
    """
    x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
    B, C, T, H, W = x.shape
    x = x.view(B, C, T // ft, ft, H // fs, fs, W // fs, fs)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)                              # (B, C, ft, fs, fs, T', H', W')
    return x.reshape(B, C * ft * fs * fs, T // ft, H // fs, W // fs)


def unfold(x, ft, fs):
    """Inverse of fold (without the padding): (B, C*ft*fs*fs, T, H, W) -> (B, C, T*ft, H*fs, W*fs)."""
    B, C, T, H, W = x.shape
    x = x.view(B, C // (ft * fs * fs), ft, fs, fs, T, H, W)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)                              # (B, C', T, ft, H, fs, W, fs)
    return x.reshape(B, C // (ft * fs * fs), T * ft, H * fs, W * fs)


class DownBlock(nn.Module):
    """A Wan2.2 encoder level: residual blocks and a resample, plus a parameter-free shortcut that
    folds the down-sampled offsets into channels and averages groups of them (official
    Down_ResidualBlock with AvgDown3D)."""

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, down_time, down_space):
        super().__init__()
        self.ft, self.fs, self.out_dim = 2 if down_time else 1, 2 if down_space else 1, out_dim
        if (in_dim * self.ft * self.fs**2) % out_dim:
            raise ValueError(f"Wan2.2 VAE level {in_dim}->{out_dim}: the shortcut cannot average evenly")
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks)]
        if down_space:
            layers.append(Resample(out_dim, "downsample3d" if down_time else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x, cache):
        short = fold(x, self.ft, self.fs)                                  # (B, C*ft*fs*fs, T', H', W')
        short = short.unflatten(1, (self.out_dim, -1)).mean(2)             # (B, out_dim, T', H', W')
        return apply_layers(self.downsamples, x, cache) + short


class UpBlock(nn.Module):
    """A Wan2.2 decoder level: residual blocks and a resample, plus a parameter-free shortcut that
    repeats channels and unfolds them into the up-sampled offsets (official Up_ResidualBlock with
    DupUp3D). On the first chunk only the last of the ft new frames is kept, matching the
    main path, which does not upsample the first frame in time."""

    def __init__(self, in_dim, out_dim, dropout, num_res_blocks, up_time, up_space):
        super().__init__()
        self.ft, self.up_space = 2 if up_time else 1, up_space
        if up_space and (out_dim * self.ft * 4) % in_dim:
            raise ValueError(f"Wan2.2 VAE level {in_dim}->{out_dim}: the shortcut cannot repeat evenly")
        self.repeats = out_dim * self.ft * 4 // in_dim
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(num_res_blocks + 1)]
        if up_space:
            layers.append(Resample(out_dim, "upsample3d" if up_time else "upsample2d", up_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x, cache):
        out = apply_layers(self.upsamples, x, cache)
        if not self.up_space:
            return out
        short = unfold(x.repeat_interleave(self.repeats, dim=1), self.ft, 2)  # (B, out_dim, T*ft, 2H, 2W)
        if cache.first:
            short = short[:, :, self.ft - 1:]
        return out + short


class Encoder3d(nn.Module):
    """Video (patchified for 2.2) -> 2*z channels; `residual` selects the Wan2.2 level layout."""

    def __init__(self, in_channels, dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample,
                 dropout, residual):
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(in_channels, dims[0])
        layers, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            down = i < len(dim_mult) - 1
            down_time = down and temperal_downsample[i]
            if residual:
                layers.append(DownBlock(cin, cout, dropout, num_res_blocks, down_time, down))
                continue
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(cin, cout, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(cout))
                cin = cout
            if down:
                layers.append(Resample(cout, "downsample3d" if down_time else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(cout, cout, dropout), AttentionBlock(cout),
                                    ResidualBlock(cout, cout, dropout))
        self.head = nn.Sequential(ChannelRMSNorm(cout), nn.SiLU(), CausalConv3d(cout, z_dim))

    def forward(self, x, cache):
        return apply_layers([self.conv1, *self.downsamples, *self.middle, *self.head], x, cache)


class Decoder3d(nn.Module):
    """z channels -> video (patchified for 2.2); `residual` selects the Wan2.2 level layout."""

    def __init__(self, dim, z_dim, out_channels, dim_mult, num_res_blocks, attn_scales, temperal_upsample,
                 dropout, residual):
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0])
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        layers, scale = [], 1.0 / 2 ** (len(dim_mult) - 2)
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            up = i < len(dim_mult) - 1
            up_time = up and temperal_upsample[i]
            if residual:
                layers.append(UpBlock(cin, cout, dropout, num_res_blocks, up_time, up))
                continue
            if i > 0:
                cin //= 2  # the Wan2.1 upsample conv before this level halved the channels (official: i in 1..3)
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(cout))
                cin = cout
            if up:
                layers.append(Resample(cout, "upsample3d" if up_time else "upsample2d", up_dim=cout // 2))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(ChannelRMSNorm(cout), nn.SiLU(), CausalConv3d(cout, out_channels))

    def forward(self, x, cache):
        return apply_layers([self.conv1, *self.middle, *self.upsamples, *self.head], x, cache)


def vae_stride(patch, dim_mult, temperal_downsample):
    """(time, height, width) compression; checks the level flags (the official code would index past them)."""
    if len(temperal_downsample) != len(dim_mult) - 1:
        raise ValueError(f"temperal_downsample needs one flag per down-sampling level ({len(dim_mult) - 1}), "
                         f"got {tuple(temperal_downsample)}")
    st = 2 ** sum(map(bool, temperal_downsample))
    if 4 % st:
        raise ValueError(f"temporal stride {st}: encoding in chunks of 4 frames needs a stride dividing 4")
    return (st, patch * 2 ** (len(dim_mult) - 1), patch * 2 ** (len(dim_mult) - 1))


def latent_stats(mean, std, z_dim):
    """Released tables when z_dim matches them, else mean 0 and std 1 (smaller test models).
    Always on the CPU (moved to the latent's device when used), also when the VAE is built on meta."""
    if z_dim != len(mean):
        return torch.zeros(z_dim, device="cpu"), torch.ones(z_dim, device="cpu")
    return torch.tensor(mean, device="cpu"), torch.tensor(std, device="cpu")


class WanVAE22(nn.Module):
    """The Wan2.2 VAE (TI2V-5B): 2x2 patchify, residual down/up levels, a wider decoder.

    Defaults build the released Wan2.2_VAE.pth (the official Wan2_2_VAE wrapper's arguments):
    z 48, stride 4x16x16, 196 keys, 704,688,668 parameters. `mean`/`std` are plain attributes,
    not buffers, so the state dict equals the official one.
    """

    patch = 2

    def __init__(self, dim=160, dec_dim=256, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True), dropout=0.0):
        super().__init__()
        if attn_scales:
            raise ValueError("the Wan2.2 VAE has no attention at its levels (official code ignores attn_scales)")
        self.z_dim = z_dim
        self.stride = vae_stride(self.patch, dim_mult, temperal_downsample)
        c = 3 * self.patch**2
        self.encoder = Encoder3d(c, dim, z_dim * 2, dim_mult, num_res_blocks, (), temperal_downsample,
                                 dropout, residual=True)
        self.conv1 = nn.Conv3d(z_dim * 2, z_dim * 2, 1)   # -> (mu, log_var)
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dec_dim, z_dim, c, dim_mult, num_res_blocks, (), temperal_downsample[::-1],
                                 dropout, residual=True)
        self.mean, self.std = latent_stats(WAN22_LATENT_MEAN, WAN22_LATENT_STD, z_dim)

    def encode(self, video):
        """(B, 3, 4n+1, H, W) in [-1, 1] -> normalised latent (B, z, n+1, H/s, W/s), s = stride[1] (16)."""
        return vae_encode(self, video)

    def decode(self, z, chunk=1, checkpoint=True):
        """Normalised latent (B, z, f, h, w) -> video (B, 3, 4(f-1)+1, h*s, w*s) in [-1, 1], s = stride[1]."""
        return vae_decode(self, z, chunk, checkpoint)


class WanVAE21(nn.Module):
    """The Wan2.1 VAE (I2V-A14B): defaults build the released Wan2.1_VAE.pth (the official
    Wan2_1_VAE wrapper's arguments): z 16, stride 4x8x8, 194 keys, 126,892,531 parameters."""

    patch = 1

    def __init__(self, dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
                 temperal_downsample=(False, True, True), dropout=0.0):
        super().__init__()
        self.z_dim = z_dim
        self.stride = vae_stride(self.patch, dim_mult, temperal_downsample)
        self.encoder = Encoder3d(3, dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales, temperal_downsample,
                                 dropout, residual=False)
        self.conv1 = nn.Conv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, 3, dim_mult, num_res_blocks, attn_scales, temperal_downsample[::-1],
                                 dropout, residual=False)
        self.mean, self.std = latent_stats(WAN21_LATENT_MEAN, WAN21_LATENT_STD, z_dim)

    def encode(self, video):
        """(B, 3, 4n+1, H, W) in [-1, 1] -> normalised latent (B, z, n+1, H/s, W/s), s = stride[1] (8)."""
        return vae_encode(self, video)

    def decode(self, z, chunk=1, checkpoint=True):
        """Normalised latent (B, z, f, h, w) -> video (B, 3, 4(f-1)+1, h*s, w*s) in [-1, 1], s = stride[1]."""
        return vae_decode(self, z, chunk, checkpoint)


def check_video(vae, video):
    st, sh, sw = vae.stride
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, F, H, W) RGB, got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video must be a float tensor in [-1, 1], got {video.dtype}")
    f, h, w = video.shape[2:]
    if (f - 1) % 4:
        raise ValueError(f"video has {f} frames; the VAE encodes 4n+1 frames (1, 5, 9, ...)")
    if h % sh or w % sw:
        raise ValueError(f"video size {h}x{w} is not divisible by the VAE's spatial stride {sh}x{sw}")
    lo, hi = video.detach().aminmax()
    if not (-1.5 <= lo and hi <= 1.5):  # catches NaN too; small overshoot (bicubic resizing) is kept as is
        raise ValueError(f"pixels must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         f"(0-255 images: x / 127.5 - 1)")


def vae_dtype(vae):
    return vae.conv1.weight.dtype


def vae_encode(vae, video):
    """Normalised latent (mu - mean) / std of the official wrapper; log_var is dropped. float32 out,
    whatever the VAE's dtype."""
    check_video(vae, video)
    x = patchify(video.to(vae_dtype(vae)), vae.patch)                   # (B, 3*p*p, F, H/p, W/p)
    f = x.shape[2]
    outs, prev = [], None
    for start, end in [(0, 1)] + [(s, s + 4) for s in range(1, f, 4)]:
        cache = Cache(prev)
        outs.append(vae.encoder(x[:, :, start:end], cache))
        prev = cache.next
    mu, _log_var = vae.conv1(torch.cat(outs, dim=2)).float().chunk(2, dim=1)   # (B, z, f', h, w) each
    shape = (1, -1, 1, 1, 1)
    return (mu - vae.mean.to(mu).view(shape)) / vae.std.to(mu).view(shape)


def decode_chunks(vae, x, bounds, keys, *prev):
    """Decode the latent frames x[:, :, a:b] for each (a, b) in `bounds`, in order, starting from
    the causal cache (keys, prev): the layers and their tensors, flat so that checkpoint sees the
    tensors (a dict argument would be kept alive whole). Returns (pixels, keys, tensors) of the
    cache the last chunk left."""
    outs = []
    for a, b in bounds:
        cache = Cache(dict(zip(keys, prev)) if keys else None)
        outs.append(vae.decoder(x[:, :, a:b], cache))
        keys, prev = tuple(cache.next), tuple(cache.next.values())
    return torch.cat(outs, dim=2), keys, prev


def vae_decode(vae, z, chunk=1, checkpoint=True):
    """Decode the first latent frame alone, then `chunk` latent frames at a time (official: 1).
    float32 out (computed in the VAE's dtype), clamped to [-1, 1] as in the official wrapper.

    With gradients on and checkpoint=True, the n chunks are checkpointed in two levels: segments
    of about sqrt(n) chunks, and each chunk inside a segment. The forward keeps only the causal
    cache at each segment's start; backward recomputes one segment (keeping its chunks' caches),
    then one chunk at a time with its activations. The caches are large at the released widths
    (two frames of every causal conv's input, ~2.5 GB per latent frame at 480x832), so memory is
    about 2 sqrt(n) caches plus one chunk's activations, not n caches; the price is one more
    forward of the decoder.
    """
    if z.ndim != 5 or z.shape[1] != vae.z_dim:
        raise ValueError(f"latent must be (B, {vae.z_dim}, f, h, w), got shape {tuple(z.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    shape = (1, -1, 1, 1, 1)
    z = z.float() * vae.std.to(z.device).view(shape) + vae.mean.to(z.device).view(shape)
    x = vae.conv2(z.to(vae_dtype(vae)))
    f = x.shape[2]
    bounds = [(0, 1)] + [(s, min(s + chunk, f)) for s in range(1, f, chunk)]
    if not (checkpoint and torch.is_grad_enabled()):
        out = decode_chunks(vae, x, bounds, ())[0]
    else:
        size = math.ceil(math.sqrt(len(bounds)))
        outs, keys, prev = [], (), ()
        for i in range(0, len(bounds), size):
            out, keys, prev = torch.utils.checkpoint.checkpoint(
                segment, vae, x, bounds[i:i + size], keys, *prev, use_reentrant=False)
            outs.append(out)
        out = torch.cat(outs, dim=2)
    return unpatchify(out, vae.patch).float().clamp(-1.0, 1.0)   # (B, 3, F, H, W)


def segment(vae, x, bounds, keys, *prev):
    """decode_chunks with each chunk checkpointed (the inner level of vae_decode)."""
    outs = []
    for a, b in bounds:
        out, keys, prev = torch.utils.checkpoint.checkpoint(
            decode_chunks, vae, x, [(a, b)], keys, *prev, use_reentrant=False)
        outs.append(out)
    return torch.cat(outs, dim=2), keys, prev


VAE_FILES = {"2.2": "Wan2.2_VAE.pth", "2.1": "Wan2.1_VAE.pth"}


def build_vae(cfg):
    """The VAE of a preset (cfg.vae "2.2" or "2.1"), randomly initialised; cfg.vae_kwargs override sizes."""
    classes = {"2.2": WanVAE22, "2.1": WanVAE21}
    if cfg.vae not in classes:
        raise ValueError(f"unknown VAE {cfg.vae!r}; choose one of {sorted(classes)}")
    return classes[cfg.vae](**cfg.vae_kwargs)


def load_vae(cfg, src, dtype=torch.float32, device="cpu"):
    """The official VAE .pth (Wan2.2_VAE.pth / Wan2.1_VAE.pth) from a folder, repo id or the file itself;
    returned frozen and in eval mode."""
    with torch.device("meta"):
        vae = build_vae(cfg)
    name = VAE_FILES[cfg.vae]
    path = src if os.path.isfile(src) else os.path.join(resolve(src, [name]), name)
    load_strict(vae, read_state_dict(path), f"VAE weights {path}")
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# umT5 text encoder and tokenizer
#
# Official code: wan/modules/t5.py (encoder of umT5-XXL) and wan/modules/tokenizers.py. umT5 is
# T5 with a relative-position bias in every layer (shared_pos False) and, like all T5s, no
# 1/sqrt(d) scaling of the attention logits. The official fp16_clamp is omitted: it acts on
# float16 only, and we run float32 (CPU) or bfloat16.


def relative_buckets(n, num_buckets, max_dist=128, device=None):
    """(n, n) bucket of key position minus query position, bidirectional T5 bucketing: half the
    buckets per direction, exact below half of those, logarithmic up to max_dist, then clipped."""
    rel = torch.arange(n, device=device)[None, :] - torch.arange(n, device=device)[:, None]
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    log_ratio = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_dist / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


class T5RelativeBias(nn.Module):
    def __init__(self, num_buckets, num_heads):
        super().__init__()
        self.num_buckets = num_buckets
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, n):
        bucket = relative_buckets(n, self.num_buckets, device=self.embedding.weight.device)
        return self.embedding(bucket).permute(2, 0, 1)[None]  # (1, heads, n, n)


class T5Attention(nn.Module):
    def __init__(self, dim, dim_attn, num_heads, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, bias):
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)   # (B, heads, L, d)
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no scaling
        return self.dropout(self.o(out.transpose(1, 2).flatten(2)))               # (B, L, dim)


class T5FeedForward(nn.Module):
    """Gated GELU (tanh approximation): fc2(fc1(x) * gelu(gate(x)))."""

    def __init__(self, dim, dim_ffn, dropout):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.fc1(x) * self.gate(x))))


class T5Block(nn.Module):
    def __init__(self, dim, dim_attn, dim_ffn, num_heads, num_buckets, dropout):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=1e-6)  # T5LayerNorm is this RMS norm
        self.attn = T5Attention(dim, dim_attn, num_heads, dropout)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.ffn = T5FeedForward(dim, dim_ffn, dropout)
        self.pos_embedding = T5RelativeBias(num_buckets, num_heads)

    def forward(self, x, bias):
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    """The umT5 encoder. forward(ids (B, L), mask (B, L) of 1/0 or None) -> (B, L, dim).

    Defaults are umT5-XXL as the official umt5_xxl() builds it (models_t5_umt5-xxl-enc-bf16.pth:
    242 keys, 5,680,910,336 parameters). Padded keys are masked; padded queries still get outputs.
    """

    def __init__(self, vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                 num_buckets=32, dropout=0.1):
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.token_embedding = nn.Embedding(vocab, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(T5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets, dropout)
                                    for _ in range(num_layers))
        self.norm = RMSNorm(dim, eps=1e-6)

    def forward(self, ids, mask=None):
        if ids.ndim != 2:
            raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask {tuple(mask.shape)} does not match ids {tuple(ids.shape)}")
        vocab = self.token_embedding.num_embeddings
        if ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(f"token id {int(ids.max())} is outside the vocabulary ({vocab})")
        x = self.dropout(self.token_embedding(ids))                    # (B, L, dim)
        n = ids.shape[1]
        for block in self.blocks:
            bias = block.pos_embedding(n)                                # (1, heads, L, L)
            if mask is not None:
                # Official: masked logits are replaced by the dtype's minimum.
                bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(bias.dtype).min)  # (B, heads, L, L)
            x = block(x, bias)
        return self.dropout(self.norm(x))


def clean_prompt(text):
    """The official "whitespace" cleaning without ftfy: HTML-unescape twice, collapse whitespace.

    (ftfy only repairs mis-decoded text such as mojibake; well-formed prompts are unchanged.)
    """
    return " ".join(html.unescape(html.unescape(text)).split())


def pad_ids(seqs, text_len, eos, pad):
    """Truncate each id list to text_len - 1, append eos, right-pad: ids and mask (B, text_len) int64."""
    ids = torch.full((len(seqs), text_len), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), text_len), dtype=torch.long)
    for i, seq in enumerate(seqs):
        seq = list(seq[: text_len - 1]) + [eos]
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


class T5Tokenizer:
    """The umT5 tokenizer from the `google/umt5-xxl` folder of the official Wan repos (tokenizer.json).

    tokenizer(prompts) -> ids, mask (B, text_len): cleaned text, </s> appended, padded with <pad>,
    truncated to text_len like the official HuggingfaceTokenizer (padding="max_length").
    """

    def __init__(self, folder, text_len=512):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.tokenizer.no_padding()      # padding and truncation are ours (pad_ids), whatever the file says
        self.tokenizer.no_truncation()
        self.text_len = text_len
        self.eos, self.pad = self.tokenizer.token_to_id("</s>"), self.tokenizer.token_to_id("<pad>")
        if self.eos is None or self.pad is None:
            raise ValueError(f"{folder}/tokenizer.json has no </s> or <pad> token: not a T5 tokenizer")

    def token_count(self, prompt):
        """Tokens of the prompt with </s>: more than text_len would be truncated."""
        return len(self.tokenizer.encode(clean_prompt(prompt), add_special_tokens=False).ids) + 1

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = self.tokenizer.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=False)
        return pad_ids([e.ids for e in encoded], self.text_len, self.eos, self.pad)


class ByteTokenizer:
    """Offline stand-in for the tiny preset: UTF-8 bytes + 3 (ids 0 <pad>, 1 </s>, 2 <unk> as in T5)."""

    pad, eos, offset = 0, 1, 3

    def __init__(self, text_len=512):
        self.text_len = text_len

    def token_count(self, prompt):
        return len(clean_prompt(prompt).encode("utf-8")) + 1

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seqs = [[b + self.offset for b in clean_prompt(p).encode("utf-8")] for p in prompts]
        return pad_ids(seqs, self.text_len, self.eos, self.pad)



@torch.no_grad()  # the text encoder is frozen in IPRO
def encode_text(prompts, t5, tokenizer):
    """Prompts -> list of (L_i, dim) umT5 states, trimmed to each prompt's tokens (</s> included)."""
    ids, mask = tokenizer(prompts)
    device = t5.token_embedding.weight.device
    context = t5(ids.to(device), mask.to(device))                   # (B, text_len, dim)
    return [c[:n] for c, n in zip(context, mask.sum(dim=1).tolist())]


T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"


def build_t5(cfg):
    """umT5-XXL, or the preset's smaller encoder (cfg.t5_kwargs), randomly initialised."""
    return T5Encoder(**cfg.t5_kwargs)


def load_t5(cfg, src, dtype=torch.float32, device="cpu"):
    """The official models_t5_umt5-xxl-enc-bf16.pth from a folder, repo id or the file itself;
    returned frozen and in eval mode (no dropout)."""
    path = src if os.path.isfile(src) else os.path.join(resolve(src, [T5_FILE]), T5_FILE)
    with torch.device("meta"):
        t5 = build_t5(cfg)
    load_strict(t5, read_state_dict(path), f"T5 weights {path}")
    return t5.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(cfg, src=None):
    """T5Tokenizer from the google/umt5-xxl folder of a local folder or repo id; src=None gives the
    ByteTokenizer stand-in (the tiny preset: no real tokenizer offline)."""
    if src is None:
        return ByteTokenizer(cfg.text_len)
    return T5Tokenizer(os.path.join(resolve(src, [f"{TOKENIZER_DIR}/*"]), TOKENIZER_DIR), cfg.text_len)


# Flow-matching schedule and solvers
#
# x_t = (1 - sigma) * x_0 + sigma * noise; the DiT predicts v = noise - x_0, so the probability
# flow ODE is dx/dsigma = v and a sampler walks sigma from ~1 down to 0.

# The official negative prompt (wan/configs/shared_config.py): the unconditional branch of CFG.
NEG_PROMPT = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"


def shift_sigma(sigma, shift):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma): shift > 1 spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def schedule(steps, shift=5.0, solver="unipc"):
    """Sigmas (steps + 1,) float32 ending in 0, and the timesteps (steps,) the DiT is fed.

    unipc: the official FlowUniPCMultistepScheduler: sigma linear from 0.999 (float32, the top of
      the official 1000-step training grid; at sigma = 1 UniPC's log(1 - sigma) is -inf) to 0,
      shifted; timesteps are int64, trunc(1000 * sigma): the 50-step list starts 999, 995, 991.
    euler: Wan2.2-Lightning's and ROLL's EulerScheduler: sigma linear from 1 to 0, shifted;
      timesteps are the float 1000 * sigma (4 steps: 1000, 937.5, 833.3, 625). They compute in
      float32; we compute in float64 and round once (within 1 ulp of theirs).
    The DiT sees these timesteps; the solver steps with the untruncated sigmas (as the official code).
    """
    if solver not in ("unipc", "euler"):
        raise ValueError(f"unknown solver {solver!r}; choose 'unipc' or 'euler'")
    top = float(torch.tensor(1 - 1 / 1000, dtype=torch.float32)) if solver == "unipc" else 1.0
    # np.linspace's arithmetic (start + i * step), so the int64 truncation matches the official list.
    sigmas = torch.arange(steps, dtype=torch.float64) * ((0.0 - top) / steps) + top
    sigmas = shift_sigma(sigmas, shift)
    timesteps = (sigmas * 1000).long() if solver == "unipc" else (sigmas * 1000).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float(), timesteps


class Euler:
    """x_next = x + (sigma_next - sigma) * v: the solver Lightning was distilled for and ROLL trains with."""

    def __init__(self, sigmas):
        self.sigmas, self.i = sigmas.tolist(), 0

    def step(self, v, x):
        sigma, sigma_next = self.sigmas[self.i], self.sigmas[self.i + 1]
        self.i += 1
        return x + (sigma_next - sigma) * v


def _lambda(sigma):
    """Half log-SNR of flow matching, log(alpha / sigma) with alpha = 1 - sigma; +inf at sigma = 0."""
    return math.inf if sigma == 0 else math.log(1 - sigma) - math.log(sigma)


class UniPC:
    """The official FlowUniPCMultistepScheduler at Wan's settings (UniPC, arXiv 2302.04867).

    Order-2 multistep predictor (UniP) and corrector (UniC) on the predicted clean latent
    m = x - sigma * v (predict_x0), B(h) = e^h - 1 ("bh2"), order 1 at the first step (warm-up)
    and at the last (lower_order_final), the corrector from the second step on; no thresholding.
    step(v, x): v is the velocity at sigmas[i]; returns x at sigmas[i + 1]. Coefficients are
    float64 Python numbers (official: float32 tensors; trajectories agree to ~2e-6).
    """

    def __init__(self, sigmas):
        self.sigmas, self.i = sigmas.tolist(), 0
        self.m = []          # clean-latent predictions of the last two steps, newest last
        self.x_prev = None   # where the last predictor step started: the corrector redoes that step
        self.order = 1       # order of the last predictor step

    def exp_step(self, x, m, i, j):
        """The first-order (DDIM) step from sigmas[i] to sigmas[j] with clean latent m; order-2
        terms enter as a correction folded into m."""
        s0, s1 = self.sigmas[i], self.sigmas[j]
        phi = math.expm1(_lambda(s0) - _lambda(s1))       # e^{-h} - 1 = B(h) for bh2
        return (s1 / s0) * x - (1 - s1) * phi * m

    def step(self, v, x):
        i, s = self.i, self.sigmas
        m = x - s[i] * v
        if i > 0:
            x = self.correct(m)
        self.m = [*self.m[-1:], m]
        self.order = min(2, i + 1, len(s) - 1 - i)
        self.x_prev = x
        m0 = self.m[-1]
        if self.order == 2:  # UniP-2 with the official fixed rho = 1/2
            r = (_lambda(s[i - 1]) - _lambda(s[i])) / (_lambda(s[i + 1]) - _lambda(s[i]))
            m0 = m0 + 0.5 * (self.m[-2] - m0) / r
        self.i += 1
        return self.exp_step(x, m0, i, i + 1)

    def correct(self, m_new):
        """UniC: redo the step sigmas[i-1] -> sigmas[i] using the new model output m_new."""
        i, s = self.i, self.sigmas
        m0 = self.m[-1]
        if self.order == 1:  # the official fixed rho = 1/2
            return self.exp_step(self.x_prev, m0 + 0.5 * (m_new - m0), i - 1, i)
        hh = _lambda(s[i - 1]) - _lambda(s[i])            # -h
        phi = math.expm1(hh)
        r = (_lambda(s[i - 2]) - _lambda(s[i - 1])) / -hh
        b1 = (phi / hh - 1) / phi
        b2 = 2 * ((phi / hh - 1) / hh - 0.5) / phi
        rho0 = (b1 - b2) / (1 - r)                        # solves [[1, 1], [r, 1]] @ rho = [b1, b2]
        rho1 = b1 - rho0
        return self.exp_step(self.x_prev, m0 + rho0 * (self.m[-2] - m0) / r + rho1 * (m_new - m0), i - 1, i)


# -----------------------------------------------------------------------------
# Sampling: I2V conditioning, guidance, and THE generation loop with a gradient window


def a14b_condition(z, known_frames=(0,)):
    """y for I2V-A14B: (B, 4 + 16, f, h, w) = [mask, z], z = VAE2.1([image, zero frames]) (B, 16, f, h, w).

    The mask has one value per pixel frame (1 = given), the first repeated 4 times so that the
    4f values fold into 4 channels per latent frame, as in the official image2video.py.
    """
    B, _, f, h, w = z.shape
    frames = 4 * (f - 1) + 1
    known = torch.zeros(frames, device=z.device, dtype=z.dtype)
    known[list(known_frames)] = 1
    known = torch.cat([known[:1].repeat(4), known[1:]])                   # (4f,)
    mask = known.view(f, 4).t()[None, :, :, None, None].expand(B, 4, f, h, w)  # (B, 4, f, h, w)
    return torch.cat([mask, z], dim=1)


def ti2v_t_mask(cfg, x):
    """TI2V's per-token timestep mask for a latent x (B, C, f, h, w): 0 on the first frame's tokens
    (the image, clean: t = 0), 1 elsewhere; the DiT's t is mask * t, shape (B, L)."""
    B, _, f, h, w = x.shape
    pt, ph, pw = cfg.patch_size
    mask = torch.ones(B, f // pt, h // ph, w // pw, device=x.device)
    mask[:, 0] = 0
    return mask.flatten(1)


def latent_shape(vae, batch, frames, height, width):
    st, sh, sw = vae.stride
    return (batch, vae.z_dim, (frames - 1) // st + 1, height // sh, width // sw)


@torch.no_grad()
def condition(cfg, vae, image, frames):
    """The I2V condition of each model from the input image (B, 3, H, W) in [-1, 1], as keyword
    arguments of generate: TI2V-5B z_img, the image's latent as the first latent frame;
    I2V-A14B y = [mask, VAE2.1([image, zero frames])]."""
    if cfg.model_type == "ti2v":
        return dict(z_img=vae.encode(image[:, :, None]))                    # (B, C, 1, h, w)
    B, _, H, W = image.shape
    video = torch.cat([image[:, :, None], image.new_zeros(B, 3, frames - 1, H, W)], dim=2)
    return dict(y=a14b_condition(vae.encode(video)))

class OnHost(nn.Module):
    """A frozen DiT whose weights stay in (pinned) host memory: each call copies them to the input's
    device and frees the copy afterwards. For I2V-A14B's high-noise expert in training, so that its
    27 GB (bf16) are not on the GPU while the low-noise expert's graph is; the price is one
    host-to-device copy per call (3 of 8 sampler steps; about 1 s each over PCIe 4)."""

    def __init__(self, model):
        super().__init__()
        self.cfg, self.inner = model.cfg, [model.cpu()]      # a list: .to(device) must not move it
        if torch.cuda.is_available():
            for p in model.parameters():
                p.data = p.data.pin_memory()                 # asynchronous copies, bounded by the model

    def forward(self, x, *args, **kwargs):
        model = self.inner[0]
        params = {k: p.to(x.device, non_blocking=True) for k, p in model.named_parameters()}
        return torch.func.functional_call(model, params, (x, *args), kwargs)


def detached_forward(model):
    """The model's forward with its parameters detached: differentiable in its inputs only."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    return lambda *args, **kwargs: torch.func.functional_call(model, params, args, kwargs)


def cat_contexts(a, b):
    """Two text batches as one for a single DiT call: tensors padded with zero rows to a common
    length (the DiT pads to text_len with zeros anyway, so nothing changes), or lists joined."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        n = max(a.shape[1], b.shape[1])
        return torch.cat([F.pad(c, (0, 0, 0, n - c.shape[1])) for c in (a, b)])   # (2B, n, text_dim)
    return [*a, *b]


def velocity(model, x_t, t, context, context_null=None, y=None, guidance=1.0):
    """Classifier-free guidance: v = v_uncond + g * (v_cond - v_uncond); one DiT call when g == 1.

    Without gradients (sampling, the rollout's early steps, the KL reference) both passes are one
    DiT call on a doubled batch: the weights are read and the kernels launched once, not twice.
    Under a gradient they stay two calls and the unconditional one runs under no_grad: a batched
    call would save both halves' activations for backward (twice the memory of a windowed step)
    even with the unconditional half detached afterwards. The gradient then flows through
    g * v_cond only; ROLL and Lightning train and sample with g = 1, where this is exact.
    """
    if guidance == 1.0:
        return model(x_t, t, context, y=y)
    if context_null is None:
        raise ValueError(f"guidance {guidance} needs context_null (the encoded NEG_PROMPT)")
    B = x_t.shape[0]
    if len(context_null) == 1 and B > 1:  # one negative prompt for the whole batch
        context_null = context_null.expand(B, -1, -1) if torch.is_tensor(context_null) else list(context_null) * B
    if torch.is_grad_enabled():
        v = model(x_t, t, context, y=y)
        with torch.no_grad():
            v_uncond = model(x_t, t, context_null, y=y)
    else:
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_contexts(context, context_null),
                     y=None if y is None else torch.cat([y, y]))                # (2B, C, f, h, w)
        v, v_uncond = both.chunk(2)
    return v_uncond + guidance * (v - v_uncond)


def progress_bar(iterable, disable=False, **kwargs):
    """tqdm; into a log (stderr not a terminal, e.g. demo.sh's) at most one frame every 30 s and the
    final one, instead of a carriage-return frame per step."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, disable=disable, **kwargs)


@dataclass
class Trace:
    """What the training loop needs from one rollout (paper Eq. 4 and the multi-step KL, Eq. 7).

    steps: one dict per windowed step: i (step index), x_t (the DiT's input, detached), t (the
      timestep tensor as fed, (B,) or per-token (B, L)), sigma (float), v (guided velocity, with
      graph), expert (index into models). v_ref for the KL is velocity(...) on the same x_t, t.
    x0_hat: x_t - sigma * v at the last step (TI2V: first frame re-imposed); with Euler it is x_0.
    graph_calls: DiT calls whose parameters are in the graph (one per windowed step; the
      unconditional CFG pass never has one).
    """
    steps: list
    x0_hat: torch.Tensor
    graph_calls: int


def generate(models, cfg, noise, context, context_null=None, z_img=None, y=None, steps=None, shift=None,
             guidance=None, solver="unipc", grad_steps=0, grad_window="low", return_trace=False,
             progress=False, checkpoint_calls=False):
    """Sample a latent video; the one sampling loop of the repository (sample, train and eval use it).

    models: one DiT, or (high_noise, low_noise) for I2V-A14B: the high-noise expert runs while the
      timestep t >= cfg.boundary * 1000. guidance: a float or one per expert, in the order of
      models (official config tuples are (low, high)).
    noise: (B, C, f, h, w), fresh N(0, 1) from the caller (the loop never seeds).
    context / context_null: text embeddings (B, L, text_dim) or lists, as WanModel takes them.
    TI2V (cfg.model_type "ti2v"): z_img (B, C, 1, h, w), the VAE latent of the image, replaces the
      first latent frame at the start and after every step; its tokens get t = 0.
    I2V-A14B (cfg.model_type "i2v"): y = a14b_condition(...) (B, 20, f, h, w), concatenated to x.
    Gradient window (paper Eq. 4, DRaFT-K truncation), K = grad_steps, named by noise level (Table 5):
      "low": the last steps N-K..N-1 keep the graph (DiT, solver, x-path); the earlier ones run under no_grad.
      "high": the first steps 0..K-1 keep the graph; the later steps keep the x-path differentiable
        through the DiT too (parameters detached, see detached_forward), so the gradient reaching the
        first K calls is exact; memory then grows with N (the paper's Table 5 ablation).
    checkpoint_calls: run each windowed DiT call under activation checkpointing as a whole (nested over
      the model's per-block checkpoints): until backward only the call's inputs are kept, not every
      block's input; backward recomputes one call at a time (one more forward per windowed step).
    Returns x_0 (B, C, f, h, w), and with return_trace=True (x_0, Trace).
    Departs from ROLL's loop, which re-seeds its noise every step (a bug) and casts the latent to
    bf16 after each step: here the noise is the caller's and the latent stays float32.
    """
    steps = cfg.sample_steps if steps is None else steps
    shift = cfg.sample_shift if shift is None else shift
    guidance = cfg.sample_guide_scale if guidance is None else guidance
    experts = tuple(models) if isinstance(models, (tuple, list)) else (models,)
    guides = tuple(guidance) if isinstance(guidance, (tuple, list)) else (guidance,) * len(experts)
    if len(guides) != len(experts):
        raise ValueError(f"{len(guides)} guidance scales for {len(experts)} models")
    if grad_window not in ("low", "high"):
        raise ValueError(f"grad_window must be 'low' or 'high', got {grad_window!r}")
    if not 0 <= grad_steps <= steps:
        raise ValueError(f"grad_steps={grad_steps} must be in [0, steps={steps}]")
    if z_img is not None and cfg.model_type != "ti2v":
        raise ValueError("z_img conditions TI2V models; I2V-A14B takes y = a14b_condition(...)")
    sigmas, timesteps = schedule(steps, shift, solver)
    solve = UniPC(sigmas) if solver == "unipc" else Euler(sigmas)
    K, grad = grad_steps, torch.is_grad_enabled()
    window = range(steps - K, steps) if grad_window == "low" else range(K)

    B = noise.shape[0]
    x = noise.float()
    t_mask = None
    if z_img is not None:
        t_mask = ti2v_t_mask(cfg, x)                                       # (B, L)
        # = (1 - mask) * z_img + mask * x of the official code, mask 0 on the first frame only.
        x = torch.cat([z_img.to(x), x[:, :, 1:]], dim=2)

    # Python floats (exact: float32 or integer values), so choosing the expert and filling t never
    # waits for the device.
    ts = timesteps.float().tolist()
    trace, graph_calls, v = [], 0, None
    for i in progress_bar(range(steps), disable=not progress, desc="sampling"):
        e = 0 if len(experts) == 1 or ts[i] >= cfg.boundary * 1000 else 1
        t_in = t_mask * ts[i] if t_mask is not None else x.new_full((B,), ts[i])   # (B, L) or (B,)
        windowed = grad and i in window
        x_path = windowed or (grad and K > 0 and grad_window == "high" and i >= K)
        with torch.set_grad_enabled(x_path):
            model = experts[e] if windowed or not x_path else detached_forward(experts[e])
            x_t = x
            if windowed and checkpoint_calls:
                v = torch.utils.checkpoint.checkpoint(velocity, model, x_t, t_in, context, context_null, y, guides[e],
                                                      use_reentrant=False)
            else:
                v = velocity(model, x_t, t_in, context, context_null, y, guides[e])
            x = solve.step(v, x_t)
            if z_img is not None:
                x = torch.cat([z_img.to(x), x[:, :, 1:]], dim=2)
        if windowed:
            graph_calls += 1
            trace.append(dict(i=i, x_t=x_t.detach(), t=t_in, sigma=sigmas[i].item(), v=v, expert=e))
    if not return_trace:
        return x
    x0_hat = x_t - sigmas[-2].item() * v                                   # the clean latent seen at the last step
    if z_img is not None:
        x0_hat = torch.cat([z_img.to(x0_hat), x0_hat[:, :, 1:]], dim=2)
    return x, Trace(trace, x0_hat, graph_calls)


@torch.no_grad()
def sample_video(experts, cfg, vae, image, frames, context, context_null=None, seed=0, amp=None, **sampler):
    """The sampling recipe of sample.py, eval.py and train.py's samples: seed -> noise -> I2V condition
    -> generate (under `amp`, an autocast context, if given) -> decode. image (1, 3, H, W) in [-1, 1];
    sampler: generate's keywords (steps, shift, guidance, solver, progress). Returns (3, F, H, W) in [-1, 1]."""
    H, W = image.shape[-2:]
    g = torch.Generator(device=image.device).manual_seed(seed)
    noise = torch.randn(latent_shape(vae, 1, frames, H, W), generator=g, device=image.device)
    cond = condition(cfg, vae, image, frames)
    with amp or contextlib.nullcontext():
        z = generate(experts, cfg, noise, context, context_null, **sampler, **cond)
    return vae.decode(z, checkpoint=False)[0]


# -----------------------------------------------------------------------------
# Images and videos in and out (sample.py, train.py and eval.py share these)


def best_output_size(w, h, dw, dh, area):
    """The official TI2V rule: the (w, h), multiples of (dw, dh), with area <= `area` whose aspect
    ratio is closest to the image's (trying width-first and height-first rounding)."""
    ratio = w / h
    ow = (area * ratio) ** 0.5
    oh = area / ow  # as official: where the exact value is a multiple of dh this lands just below it
    ow1 = int(ow // dw * dw)
    oh2 = int(oh // dh * dh)
    if ow1 == 0 or oh2 == 0:
        raise ValueError(f"image of {w}x{h} pixels: its aspect ratio is too extreme for an area of {area} "
                         f"pixels in steps of {dw}x{dh}")
    oh1 = int(area / ow1 // dh * dh)
    ow2 = int(area / oh2 // dw * dw)
    err1 = max(ratio / (ow1 / oh1), (ow1 / oh1) / ratio)
    err2 = max(ratio / (ow2 / oh2), (ow2 / oh2) / ratio)
    return (ow1, oh1) if err1 < err2 else (ow2, oh2)


def load_image(path):
    """An RGB PIL image as a viewer shows it: EXIF orientation applied (phone photos; the official
    code ignores it and gets them sideways), grayscale, RGBA (composited on white) and 16-bit converted."""
    from PIL import Image, ImageOps
    try:
        img = Image.open(path)
        img.load()
        img = ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except Exception as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img)
    if img.mode.startswith("I"):  # 16-bit gray (I;16, I;16B, ...; older Pillow: I): 0-65535 -> 0-255
        import numpy as np
        a = np.asarray(img, dtype=np.float64) / 257
        img = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def prepare_image(img, cfg, size):
    """PIL image -> (3, H, W) in [-1, 1] at the preset's working size, as the official code does:
    TI2V: the best (multiple of patch*stride) size of area H*W, resized to cover (Lanczos), centre-cropped;
    I2V-A14B: bicubic resize to the size of area H*W with the image's aspect ratio, no crop."""
    import numpy as np
    from PIL import Image
    iw, ih = img.size
    area = size[0] * size[1]
    dh, dw = cfg.vae_stride[1] * cfg.patch_size[1], cfg.vae_stride[2] * cfg.patch_size[2]
    if cfg.model_type == "ti2v":
        ow, oh = best_output_size(iw, ih, dw, dh, area)
        scale = max(ow / iw, oh / ih)
        img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
        x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
        img = img.crop((x1, y1, x1 + ow, y1 + oh))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
        return x
    aspect = ih / iw
    oh = round(math.sqrt(area * aspect) // dh * dh)
    ow = round(math.sqrt(area / aspect) // dw * dw)
    if oh == 0 or ow == 0:
        raise ValueError(f"image of {iw}x{ih} pixels: its aspect ratio is too extreme for an area of {area} "
                         f"pixels in steps of {dw}x{dh}")
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return F.interpolate(x[None], size=(oh, ow), mode="bicubic")[0]


def check_writable(folder):
    """Makes --out `folder` and writes a file in it, or ValueError. A real file, not os.access: root
    passes os.access on any folder, read-only mounts included."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--out {folder} is not a writable folder: {err}") from None


def save_video(path, video, fps, metadata=None):
    """(3, F, H, W) in [-1, 1] -> H.264 mp4, written to a temporary file then renamed, so a crash
    never leaves a partial mp4; the temporary name ends in .partial, so that a folder scan never takes
    it for a video. A non-finite video is a ValueError and nothing is written. metadata (a dict) goes
    to a JSON file beside it."""
    import imageio_ffmpeg
    import numpy as np
    if not torch.isfinite(video).all():
        bad = (~torch.isfinite(video)).float().mean().item()
        raise ValueError(f"{path}: the video has non-finite values ({bad:.1%} NaN or inf); nothing written "
                         f"(the weights or the sampler diverged)")
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    frames = frames.permute(1, 2, 3, 0).cpu().numpy()                      # (F, H, W, 3)
    tmp = f"{path}.tmp{os.getpid()}.partial"
    try:
        # imageio-ffmpeg directly: imageio picks the format from the extension, ffmpeg takes "-f mp4".
        writer = imageio_ffmpeg.write_frames(tmp, (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                             quality=9, macro_block_size=1, pix_fmt_out="yuv420p",
                                             output_params=["-f", "mp4"])
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if metadata is not None:
        with open(os.path.splitext(path)[0] + ".json", "w") as fh:
            json.dump(metadata, fh, indent=1)


def read_video(path, frames=None):
    """mp4 (or any ffmpeg-readable video) -> uint8 array (F, H, W, 3), the first `frames` frames."""
    import imageio.v3 as iio
    import numpy as np
    out = []
    for i, frame in enumerate(iio.imiter(path)):
        if frames is not None and i >= frames:
            break
        out.append(frame[..., :3] if frame.ndim == 3 else np.repeat(frame[..., None], 3, -1))
    if not out:
        raise ValueError(f"{path}: no frames")
    return np.stack(out)
