"""The Wan2.2 / Wan2.1 VAEs against diffusers' AutoencoderKLWan, the released layouts, and bad input."""
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

import wan
from bench import wan22_to_diffusers

TOL = 1e-4
# Small but complete layouts: four levels, two res blocks (diffusers' 2.1 converter assumes both).
TINY21 = dict(dim=8, z_dim=4, dim_mult=(1, 2, 4, 4), num_res_blocks=2)
TINY22 = dict(dim=8, dec_dim=12, z_dim=6, dim_mult=(1, 2, 4, 4), num_res_blocks=2)

def randomized(vae, seed=0):
    """Perturb the init so every parameter matters (attention proj starts at zero, norms at one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            elif "proj" in name:
                p.copy_(0.5 * noise / p[0].numel() ** 0.5)
    vae.mean, vae.std = 0.3 * torch.randn(vae.z_dim, generator=g), 0.5 + torch.rand(vae.z_dim, generator=g)
    return vae.eval()


def diffusers_twin(vae, version):
    """AutoencoderKLWan holding the same weights as our VAE."""
    if version == "2.1":
        ref = AutoencoderKLWan(base_dim=TINY21["dim"], z_dim=TINY21["z_dim"], dim_mult=list(TINY21["dim_mult"]),
                               num_res_blocks=2, temperal_downsample=[False, True, True],
                               latents_mean=vae.mean.tolist(), latents_std=vae.std.tolist())
        sd = convert_wan_vae_to_diffusers(vae.state_dict())
    else:
        ref = AutoencoderKLWan(base_dim=TINY22["dim"], decoder_base_dim=TINY22["dec_dim"], z_dim=TINY22["z_dim"],
                               dim_mult=list(TINY22["dim_mult"]), num_res_blocks=2,
                               temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                               out_channels=12, patch_size=2, scale_factor_spatial=16,
                               latents_mean=vae.mean.tolist(), latents_std=vae.std.tolist())
        sd = wan22_to_diffusers(vae.state_dict())
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def pair(request):
    torch.manual_seed(0)
    version = request.param
    ours = randomized(wan.WanVAE21(**TINY21) if version == "2.1" else wan.WanVAE22(**TINY22))
    return version, ours, diffusers_twin(ours, version)


def clip(batch, frames, stride, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, 2 * stride, 2 * stride, generator=g) * 2 - 1


@pytest.mark.parametrize("batch, frames", [(1, 1), (2, 9)])
def test_encode_decode_match_diffusers(pair, batch, frames):
    version, ours, ref = pair
    video = clip(batch, frames, ours.stride[1])
    shape = (1, -1, 1, 1, 1)
    mean, std = ours.mean.view(shape), ours.std.view(shape)
    with torch.no_grad():
        z = ours.encode(video)
        z_ref = (ref.encode(video).latent_dist.mean - mean) / std
        assert z.shape == (batch, ours.z_dim, (frames - 1) // 4 + 1, 2, 2)
        assert (z - z_ref).abs().max() <= TOL
        assert z.std() > 0.1  # a latent that carries signal, so the comparison means something
        out = ours.decode(z)
        out_ref = ref.decode(z * std + mean).sample
    assert out.shape == video.shape
    assert (out - out_ref).abs().max() <= TOL
    assert 0.05 < out.abs().mean() < 0.95  # mostly unclamped pixels


@pytest.mark.parametrize("latent_frames", [4, 10])   # 2 segments of 2 chunks; 3 segments (4, 4, 2)
def test_chunked_checkpointed_decode_equals_one_go_with_gradient(pair, latent_frames):
    _, vae, _ = pair
    vae.requires_grad_(False)
    z0 = torch.randn(2, vae.z_dim, latent_frames, 2, 2, generator=torch.Generator().manual_seed(1))
    grads, outs = [], []
    # Frame by frame and checkpointed, versus all frames after the first in one plain call (the first
    # latent frame is always decoded alone: it is the one the decoder does not upsample in time).
    for chunk, checkpoint in [(1, True), (3, False)]:
        z = z0.clone().requires_grad_(True)
        out = vae.decode(z, chunk=chunk, checkpoint=checkpoint)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(z.grad)
    assert outs[0].shape == (2, 3, 4 * latent_frames - 3, 2 * vae.stride[1], 2 * vae.stride[2])
    assert (outs[0] - outs[1]).abs().max() <= TOL
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    assert (grads[0] - grads[1]).abs().max() <= TOL * max(1.0, grads[1].abs().max().item())
    # Causality: the first latent frame's pixels do not depend on later latent frames.
    z = z0.clone().requires_grad_(True)
    vae.decode(z)[:, :, 0].sum().backward()
    assert z.grad[:, :, 1:].abs().max() == 0 and z.grad[:, :, 0].abs().max() > 0


def test_released_layouts_on_meta():
    for cls, keys, params, stride in [(wan.WanVAE22, 196, 704_688_668, (4, 16, 16)),
                                      (wan.WanVAE21, 194, 126_892_531, (4, 8, 8))]:
        with torch.device("meta"):
            vae = cls()
        sd = vae.state_dict()
        assert (len(sd), sum(v.numel() for v in sd.values())) == (keys, params)
        assert vae.stride == stride
        assert not list(vae.buffers())  # the latent tables stay out of the state dict
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in wan.WanVAE22(**TINY22).state_dict()
    assert "decoder.upsamples.3.resample.1.weight" in wan.WanVAE21(**TINY21).state_dict()
    assert len(wan.WAN22_LATENT_MEAN) == len(wan.WAN22_LATENT_STD) == 48
    assert len(wan.WAN21_LATENT_MEAN) == len(wan.WAN21_LATENT_STD) == 16


def test_tiny_preset_matches_its_config():
    cfg = wan.CONFIGS["tiny"]
    vae = wan.build_vae(cfg)
    assert isinstance(vae, {"2.2": wan.WanVAE22, "2.1": wan.WanVAE21}[cfg.vae])
    assert vae.stride == cfg.vae_stride and vae.z_dim == cfg.in_dim == cfg.out_dim
    st, sh, sw = cfg.vae_stride
    video = clip(1, 2 * st + 1, sh)
    with torch.no_grad():
        z = vae.encode(video)
        assert z.shape == (1, cfg.in_dim, 3, 2, 2)
        assert vae.decode(z).shape == video.shape


def test_bad_inputs_raise_clear_errors():
    vae = wan.WanVAE21(**TINY21)
    good = clip(1, 5, 8)
    cases = [(good[:, :, :4], "4n\\+1"), (good[..., :12, :], "divisible"), (good[:, :2], "RGB"),
             (good * 127.5 + 127.5, "\\[-1, 1\\]"), (good[0], "RGB"), ((good > 0).long(), "float"),
             (good.clone().fill_(float("nan")), "\\[-1, 1\\]")]
    for video, message in cases:
        with pytest.raises(ValueError, match=message):
            vae.encode(video)
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="one flag per"):
        wan.WanVAE22(dim_mult=(1, 2, 2))


def test_load_vae_from_folder_and_wrong_keys(tmp_path):
    cfg = wan.CONFIGS["tiny"]
    vae = randomized(wan.build_vae(cfg))
    torch.save(vae.state_dict(), tmp_path / wan.VAE_FILES[cfg.vae])
    loaded = wan.load_vae(cfg, str(tmp_path))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)

    sd = vae.state_dict()
    sd["decoder.head.2.wieght"] = sd.pop("decoder.head.2.weight")
    torch.save(sd, tmp_path / "renamed.pth")
    named = r"missing \['decoder\.head\.2\.weight'\].*unexpected \['decoder\.head\.2\.wieght'\]"
    with pytest.raises(KeyError, match=named):
        wan.load_vae(cfg, str(tmp_path / "renamed.pth"))
    sd = vae.state_dict()
    sd["conv2.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match="conv2.bias"):
        wan.load_vae(cfg, str(tmp_path / "reshaped.pth"))
