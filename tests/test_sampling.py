"""Schedule and solvers against diffusers (set up as the official Wan schedulers)."""
import numpy as np
import pytest
import torch
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

