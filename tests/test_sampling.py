"""Schedule and solvers against diffusers (set up as the official Wan schedulers), and generate():
gradient window, TI2V first-frame conditioning, A14B expert switch, guidance."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

import wan

# Read off the official FlowUniPCMultistepScheduler (set_timesteps(n, shift=5.0)), head and tail.
OFFICIAL_UNIPC = {50: ([999, 995, 991, 987, 982, 978], [241, 172, 92]),
                  40: ([999, 994, 989, 983, 978, 972], [288, 208, 113]),
                  8: ([999, 972, 937, 892, 833, 749], [749, 624, 416])}


def diffusers_unipc(steps):
    """diffusers' UniPC configured as the official Wan scheduler. Its own default flow sigmas run
    from 1 to 1/1000 (official: 0.999 to 0), so the official unshifted sigmas are passed in."""
    s = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                flow_shift=5.0, solver_order=2, predict_x0=True, solver_type="bh2",
                                lower_order_final=True, final_sigmas_type="zero")
    s.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1])
    return s


def diffusers_euler(steps):
    """Lightning's/ROLL's Euler schedule: diffusers' default ends at sigma_min, so pass linspace(1, 0)."""
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    s.set_timesteps(sigmas=np.linspace(1, 0, steps + 1)[:-1])
    return s


@pytest.mark.parametrize("steps", [50, 40, 8])
def test_unipc_schedule_matches_official_and_diffusers(steps):
    sigmas, timesteps = wan.schedule(steps, 5.0, "unipc")
    ref = diffusers_unipc(steps)
    assert timesteps.dtype == torch.int64 and torch.equal(timesteps, ref.timesteps)
    assert sigmas.shape == (steps + 1,) and sigmas[-1] == 0
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=0, atol=1e-6)
    head, tail = OFFICIAL_UNIPC[steps]
    assert timesteps[:len(head)].tolist() == head and timesteps[-len(tail):].tolist() == tail


@pytest.mark.parametrize("steps", [50, 40, 8, 4])
def test_euler_schedule_matches_diffusers_and_lightning(steps):
    sigmas, timesteps = wan.schedule(steps, 5.0, "euler")
    ref = diffusers_euler(steps)
    torch.testing.assert_close(timesteps / 1000, ref.timesteps / 1000, rtol=0, atol=1e-6)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=0, atol=1e-6)
    assert sigmas[0] == 1 and sigmas[-1] == 0
    expected = {4: [1000, 937.5, 833.33, 625], 8: [1000, 972.2, 937.5, 892.9, 833.3, 750, 625, 416.7]}
    if steps in expected:
        torch.testing.assert_close(timesteps, torch.tensor(expected[steps]), rtol=0, atol=0.05)


def fake_field(seed=0):
    """A fixed velocity field: a random linear map of x plus the straight-line velocity noise - x_0."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 4, 3, 5, 5, generator=g), torch.randn(2, 4, 3, 5, 5, generator=g)
    W = torch.randn(4, 4, generator=g) * 0.3
    return noise, lambda x: 0.2 * torch.einsum("ij,bj...->bi...", W, x) + noise - x0


@pytest.mark.parametrize("steps", [50, 8, 3])
def test_unipc_trajectory_matches_diffusers(steps):
    noise, v = fake_field()
    sigmas, _ = wan.schedule(steps, 5.0, "unipc")
    ours, ref = wan.UniPC(sigmas), diffusers_unipc(steps)
    x, xr = noise.clone(), noise.clone()
    for t in ref.timesteps:
        x = ours.step(v(x), x)
        xr = ref.step(v(xr), t, xr, return_dict=False)[0]
        torch.testing.assert_close(x, xr, rtol=0, atol=1e-5)
    assert (x - noise).abs().mean() > 0.1  # it did move


def test_euler_trajectory_matches_diffusers():
    noise, v = fake_field(1)
    sigmas, _ = wan.schedule(8, 5.0, "euler")
    ours, ref = wan.Euler(sigmas), diffusers_euler(8)
    x, xr = noise.clone(), noise.clone()
    for t in ref.timesteps:
        x = ours.step(v(x), x)
        xr = ref.step(v(xr), t, xr, return_dict=False)[0]
        torch.testing.assert_close(x, xr, rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# generate() with tiny DiTs

SMALL = dict(dim=64, ffn_dim=96, freq_dim=32, text_dim=24, num_heads=2, num_layers=2, text_len=16)
TI2V = wan.WanConfig(model_type="ti2v", in_dim=8, out_dim=8, **SMALL)
A14B = wan.WanConfig(model_type="i2v", in_dim=16 + 20, out_dim=16, boundary=0.9, **SMALL)


def tiny(cfg, seed=0):
    """Random values everywhere (the official init zeroes the head, so v would be 0)."""
    torch.manual_seed(seed)
    model = wan.WanModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


class Probe(nn.Module):
    """Wraps a DiT; scales call n's velocity by gain[n], so gain.grad[n] says whether call n's
    parameters got a gradient, and records what each call saw."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.cfg = model, model.cfg
        self.gain = nn.Parameter(torch.ones(calls))
        self.n, self.grad_enabled, self.t, self.x = 0, [], [], []

    def forward(self, x, t, context, y=None):
        self.grad_enabled.append(torch.is_grad_enabled())
        self.t.append(t.detach().clone())
        self.x.append(x.detach().clone())
        v = self.model(x, t, context, y=y) * self.gain[self.n]
        self.n += 1
        return v


def ti2v_inputs(B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, 8, 3, 4, 6, generator=g)           # 3 latent frames, 2x3 tokens each
    z_img = torch.randn(B, 8, 1, 4, 6, generator=g)
    ctx, ctx_null = torch.randn(B, 5, 24, generator=g), torch.randn(1, 7, 24, generator=g)
    return noise, z_img, ctx, ctx_null


def test_low_window_builds_exactly_k_graphs():
    probe = Probe(tiny(TI2V), 8)
    noise, z_img, ctx, _ = ti2v_inputs()
    x0, trace = wan.generate(probe, TI2V, noise, ctx, z_img=z_img, steps=8, guidance=1.0, solver="euler",
                             grad_steps=4, return_trace=True)
    assert probe.grad_enabled == [False] * 4 + [True] * 4
    assert trace.graph_calls == 4 and [s["i"] for s in trace.steps] == [4, 5, 6, 7]
    assert all(s["v"].requires_grad and not s["x_t"].requires_grad for s in trace.steps)
    assert x0.requires_grad
    with torch.no_grad():  # sampling: no graph whatever K says
        _, trace = wan.generate(Probe(tiny(TI2V), 8), TI2V, noise, ctx, z_img=z_img, steps=8, guidance=1.0,
                                solver="euler", grad_steps=4, return_trace=True)
    assert trace.graph_calls == 0


@pytest.mark.parametrize("window,solver", [("low", "euler"), ("low", "unipc"), ("high", "euler"),
                                           ("high", "unipc")])
def test_window_gradients_equal_full_backprop_on_the_window(window, solver):
    """Full backprop (K = N) gives the exact d loss / d gain[n] for every call n; the window must
    reproduce it on its K calls and give nothing to the others."""
    N, K = 8, 3
    noise, z_img, ctx, _ = ti2v_inputs(seed=1)
    w = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    grads = {}
    for k in (N, K):
        probe = Probe(tiny(TI2V), N)
        x0 = wan.generate(probe, TI2V, noise, ctx, z_img=z_img, steps=N, guidance=1.0, solver=solver,
                          grad_steps=k, grad_window=window)
        (x0 * w).sum().backward()
        grads[k] = probe.gain.grad
    full, part = grads[N], grads[K]
    inside = torch.arange(N) >= N - K if window == "low" else torch.arange(N) < K
    assert (full.abs() > 1e-4).all()
    torch.testing.assert_close(part[inside], full[inside], rtol=1e-4, atol=1e-6)
    assert (part[~inside] == 0).all()


def test_ti2v_first_frame_and_per_token_time():
    probe = Probe(tiny(TI2V), 8)
    noise, z_img, ctx, _ = ti2v_inputs(B=2)
    x0, trace = wan.generate(probe, TI2V, noise, ctx, z_img=z_img, steps=4, guidance=1.0, solver="unipc",
                             grad_steps=1, return_trace=True)
    assert torch.equal(x0[:, :, :1], z_img) and not torch.equal(x0[:, :, 1:], noise[:, :, 1:])
    _, timesteps = wan.schedule(4, 5.0, "unipc")
    first = 2 * 3                                               # tokens of the first latent frame
    for x, t, ts in zip(probe.x, probe.t, timesteps):
        assert torch.equal(x[:, :, :1], z_img)
        assert t.shape == (2, 3 * first)
        assert (t[:, :first] == 0).all() and (t[:, first:] == float(ts)).all()
    assert torch.equal(trace.x0_hat[:, :, :1], z_img)


def test_euler_x0_hat_is_the_output():
    noise, z_img, ctx, _ = ti2v_inputs()
    x0, trace = wan.generate(tiny(TI2V), TI2V, noise, ctx, z_img=z_img, steps=4, guidance=1.0, solver="euler",
                             grad_steps=2, return_trace=True)
    last = trace.steps[-1]
    assert last["i"] == 3
    torch.testing.assert_close(trace.x0_hat[:, :, 1:], (last["x_t"] - last["sigma"] * last["v"])[:, :, 1:])
    assert torch.equal(trace.x0_hat, x0)


def test_guidance_combines_cond_and_uncond_without_uncond_graph():
    model = Probe(tiny(TI2V), 3)
    noise, z_img, ctx, ctx_null = ti2v_inputs(B=2)
    t = torch.full((2,), 500.0)
    v = wan.velocity(model, noise, t, ctx, ctx_null, guidance=4.0)
    assert model.grad_enabled == [True, False]
    with torch.no_grad():
        m = model.model
        v_c, v_u = m(noise, t, ctx), m(noise, t, ctx_null.expand(2, -1, -1))
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u))
    with pytest.raises(ValueError, match="context_null"):
        wan.velocity(model, noise, t, ctx, None, guidance=4.0)


def test_guidance_without_grad_is_one_batched_call():
    model = Probe(tiny(TI2V), 1)
    noise, z_img, ctx, ctx_null = ti2v_inputs(B=2)
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        v = wan.velocity(model, noise, t, ctx, ctx_null, guidance=4.0)
        m = model.model
        v_c, v_u = m(noise, t, ctx), m(noise, t, ctx_null.expand(2, -1, -1))
    assert model.n == 1 and model.x[0].shape[0] == 4
    torch.testing.assert_close(v, v_u + 4.0 * (v_c - v_u))
    # Contexts of different lengths, as lists: the same as padded tensors.
    with torch.no_grad():
        w = wan.velocity(m, noise, t, list(ctx), list(ctx_null[:, :5]), guidance=4.0)
        v_u5 = m(noise, t, ctx_null[:, :5].expand(2, -1, -1))
    torch.testing.assert_close(w, v_u5 + 4.0 * (v_c - v_u5))


def test_a14b_condition_layout():
    z = torch.randn(2, 16, 3, 4, 4)                             # 3 latent frames = 9 pixel frames
    y = wan.a14b_condition(z)
    assert y.shape == (2, 20, 3, 4, 4) and torch.equal(y[:, 4:], z)
    assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()
    last = wan.a14b_condition(z, known_frames=(8,))[:, :4]      # pixel frame 8 = latent frame 2, 4th slot
    assert (last[:, 3, 2] == 1).all() and last.sum() == 2 * 16


def test_a14b_expert_switch_and_guidance_per_expert():
    """8 Euler steps, shift 5: t = 1000, 972, 938 on the high-noise expert, 893 ... 417 on the low."""
    high, low = Probe(tiny(A14B, 0), 16), Probe(tiny(A14B, 1), 16)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 16, 3, 4, 4, generator=g)
    y = wan.a14b_condition(torch.randn(1, 16, 3, 4, 4, generator=g))
    ctx, ctx_null = torch.randn(1, 5, 24, generator=g), torch.randn(1, 5, 24, generator=g)
    x0 = wan.generate((high, low), A14B, noise, ctx, ctx_null, y=y, steps=8, guidance=(3.5, 1.0), solver="euler")
    assert x0.shape == noise.shape
    # Sampling runs without gradient, so CFG is one call on a doubled batch, on the high-noise expert only.
    assert high.n == 3 and low.n == 5
    assert [len(x) for x in high.x] == [2, 2, 2] and [len(x) for x in low.x] == [1] * 5
    assert all((t >= 900).all() for t in high.t) and all((t < 900).all() for t in low.t)
    _, trace = wan.generate((high, low), A14B, noise, ctx, ctx_null, y=y, steps=8, guidance=(3.5, 1.0),
                            solver="euler", grad_steps=4, return_trace=True)
    assert [s["expert"] for s in trace.steps] == [1, 1, 1, 1]   # the last K = 4 are all low-noise


def test_generate_leaves_the_global_rng_alone():
    noise, z_img, ctx, _ = ti2v_inputs()
    model = tiny(TI2V)
    state = torch.get_rng_state()
    wan.generate(model, TI2V, noise, ctx, z_img=z_img, steps=2, guidance=1.0)
    assert torch.equal(state, torch.get_rng_state())
