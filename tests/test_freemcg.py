"""FreeMCG: the ensemble gradient converges to the true gradient, the manifold constraint holds,
maps are deterministic and batch-invariant, and bad options are refused with the valid ones."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import make_cfg
from harness.models.classifier import Classifier
from harness.types import HarnessError
from harness.xai.base import ModelCost
from harness.xai.freemcg import Denoiser, DiffusersDenoiser, FreeMCG, WienerDenoiser

SHAPE = (3, 8, 8)
D = 3 * 8 * 8


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def wrap(net: nn.Module) -> Classifier:
    return Classifier(net, input_size=8, mean=(0, 0, 0), std=(1, 1, 1)).eval()


def linear_model(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 4))
    return wrap(net), net[1].weight.detach()


def mlp(seed: int = 1):
    """A smooth nonlinear model, clearly curved at the noise scale used below (its gradient at x
    and its Gaussian-smoothed gradient correlate only ~0.8-0.9)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, 4))
    with torch.no_grad():
        net[1].weight.mul_(16.0)
    return wrap(net)


class NoGradModel(nn.Module):
    """Fails if it is ever run with autograd on: FreeMCG must be forward-only (black box)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        assert not torch.is_grad_enabled() and not x.requires_grad
        return self.model(x)


class SubspaceProjection:
    """Toy denoiser: orthogonal projection onto a known k-dimensional linear subspace (the
    'manifold'), whatever the noise level. Follows the :class:`Denoiser` protocol."""

    def __init__(self, k: int = 8, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.basis, _ = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))  # [D, k]

    def project(self, v: torch.Tensor) -> torch.Tensor:
        flat = v.reshape(len(v), -1).double()
        return (flat @ self.basis @ self.basis.T).reshape(v.shape)

    def __call__(self, x_t: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.project(x_t).to(x_t.dtype)


def smoothed_autograd_gradient(model, x, t, sigma, output, n=4000, seed=7):
    """E[grad s(x + sigma eps)] by autograd (the quantity the no-denoiser estimate targets)."""
    g = torch.Generator().manual_seed(seed)
    xs = (x[:, None] + sigma * torch.randn(len(x), n, *x.shape[1:], generator=g)).reshape(-1, *x.shape[1:])
    xs.requires_grad_(True)
    out = model(xs)
    score = {"logit": out, "log_softmax": out.log_softmax(-1), "softmax": out.softmax(-1)}[output]
    (grad,) = torch.autograd.grad(score.gather(1, t.repeat_interleave(n)[:, None]).sum(), xs)
    return grad.view(len(x), n, *x.shape[1:]).mean(1)


def test_linear_model_estimate_converges_to_the_true_gradient():
    """f = W x + b: the estimate is C_xx w / sigma^2 with C_xx the sample covariance, so its
    relative error is about sqrt(D / J) (measured: 1.72, 0.65, 0.24 for J = 64, 512, 4096)."""
    model, weight = linear_model()
    x, t = torch.rand(2, *SHAPE), torch.tensor([1, 3])
    w = weight[t].view(2, *SHAPE)
    errors = []
    for n in (64, 512, 4096):
        g = FreeMCG(n_particles=n, sigma=0.1, output="logit", attribution="gradient").estimate_gradient(
            NoGradModel(model), x, t)
        errors.append(max(float((g[i] - w[i]).norm() / w[i].norm()) for i in range(2)))
        if n == 4096:
            assert min(corr(g[i], w[i]) for i in range(2)) > 0.95
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.35


@pytest.mark.parametrize("output", ["logit", "log_softmax", "softmax"])
def test_nonlinear_model_estimate_matches_the_smoothed_autograd_gradient(output):
    """Measured (logit): corr(estimate, smoothed gradient) 0.976 / 0.969, against 0.86 / 0.80
    with the plain gradient at x; norm ratio 1.05 / 1.04."""
    model = mlp()
    torch.manual_seed(5)
    x, t = torch.rand(2, *SHAPE), torch.tensor([0, 2])
    sigma = 0.2
    ref = smoothed_autograd_gradient(model, x, t, sigma, output)
    x0 = x.clone().requires_grad_(True)
    out = model(x0)
    score = {"logit": out, "log_softmax": out.log_softmax(-1), "softmax": out.softmax(-1)}[output]
    (point,) = torch.autograd.grad(score.gather(1, t[:, None]).sum(), x0)
    g = FreeMCG(n_particles=4096, sigma=sigma, output=output).estimate_gradient(NoGradModel(model), x, t)
    for i in range(2):
        assert corr(g[i], ref[i]) > 0.93
        assert corr(g[i], ref[i]) > corr(g[i], point[i]) + 0.03  # it is the smoothed gradient
        assert 0.8 < float(g[i].norm() / ref[i].norm()) < 1.25  # with the scale of a gradient


def test_deterministic_batch_invariant_and_batch_size_invariant():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 4))
    model = wrap(net)
    x = torch.rand(5, 8, 8, 3).permute(0, 3, 1, 2)  # channels-last, as images are loaded: not contiguous
    t = torch.tensor([0, 1, 2, 3, 0])
    for attribution in FreeMCG.ATTRIBUTIONS:
        ex = FreeMCG(n_particles=16, sigma=0.1, attribution=attribution, batch_size=40, seed=3)
        a = ex(model, x, t)
        assert a.shape == (5, 8, 8) and a.dtype == np.float32 and np.isfinite(a).all() and np.abs(a).sum() > 0
        np.testing.assert_array_equal(ex(model, x, t), a)  # same seed, same map
        np.testing.assert_allclose(ex(model, x[2:3], t[2:3])[0], a[2], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ex(model, x[[4, 1]], t[[4, 1]]), a[[4, 1]], rtol=1e-5, atol=1e-7)
        for bs in (1, 7, 1000):  # model/denoiser call sizes change nothing
            other = FreeMCG(n_particles=16, sigma=0.1, attribution=attribution, batch_size=bs, seed=3)
            # float32 sums in other call sizes: equal to 1e-5 of the map's scale
            np.testing.assert_allclose(other(model, x, t), a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert not np.allclose(FreeMCG(n_particles=16, seed=4)(model, x, t), FreeMCG(n_particles=16, seed=3)(model, x, t))


def test_denoiser_constrains_the_estimate_to_the_manifold():
    """Particles projected onto a k-dim subspace: the estimate lies in it (to float precision) and
    is the projected gradient P w, found with far fewer particles than the full space needs."""
    model, weight = linear_model()
    proj = SubspaceProjection(k=8)
    assert isinstance(proj, Denoiser)
    x, t = torch.rand(2, *SHAPE), torch.tensor([1, 3])
    g = FreeMCG(n_particles=256, sigma=0.1, output="logit", denoiser=proj).estimate_gradient(model, x, t)
    off = g.double() - proj.project(g)
    assert float(off.norm() / g.norm()) < 1e-5
    pw = proj.project(weight[t].view(2, *SHAPE))
    assert min(corr(g[i], pw[i]) for i in range(2)) > 0.95
    free = FreeMCG(n_particles=256, sigma=0.1, output="logit").estimate_gradient(model, x, t)
    assert float((free.double() - proj.project(free)).norm() / free.norm()) > 0.9  # unconstrained: mostly off


def test_wiener_denoiser_is_the_gaussian_prior_posterior_mean_and_smooths_the_estimate():
    den = WienerDenoiser(alpha=2.0, prior_std=0.25)
    x = torch.rand(2, *SHAPE)
    const = torch.full((1, *SHAPE), 0.3)
    torch.testing.assert_close(den(const, 0.2), const)  # the mean passes unchanged
    torch.testing.assert_close(den(x, 1e-6), x, atol=1e-4, rtol=0)  # no noise: identity
    gain = den.gain(8, 8, 0.2)
    assert (gain > 0).all() and (gain <= 1).all() and gain[0, 1] > gain[4, 4]  # low-pass
    # Tweedie for the prior: on samples of the prior, its MSE is the posterior variance.
    h = w = 32
    sigma = 0.2
    g = torch.Generator().manual_seed(0)
    gain = den.gain(h, w, sigma)
    spec = gain * sigma**2 / (1 - gain).clamp_min(1e-12)  # S, from S / (S + sigma^2)
    white = torch.fft.rfft2(torch.randn(64, 3, h, w, generator=g, dtype=torch.float64))
    clean = torch.fft.irfft2(white * spec.sqrt(), s=(h, w))
    clean = clean - clean.mean((2, 3), keepdim=True) + 0.5
    assert abs(float(clean.std()) - 0.25) < 0.02  # prior_std
    noisy = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    mse = float(((den(noisy.float(), sigma).double() - clean) ** 2).mean())
    full = den.gain(h, w, sigma)
    expected = float((torch.cat([full, full[:, 1 : (w + 1) // 2].flip(1)], 1) * sigma**2).sum()) / (h * w)
    assert abs(mse - expected) < 0.1 * expected and mse < 0.5 * sigma**2
    model, _ = linear_model()
    t = torch.tensor([1, 3])
    g_free = FreeMCG(n_particles=512, sigma=0.2, output="logit").estimate_gradient(model, x, t)
    g_den = FreeMCG(n_particles=512, sigma=0.2, output="logit", denoiser=den).estimate_gradient(model, x, t)

    def high_freq_share(g):
        spec = torch.fft.rfft2(g.double()).abs() ** 2
        return float(spec[..., 2:-2, 2:].sum() / spec.sum())

    assert high_freq_share(g_den) < 0.5 * high_freq_share(g_free)


def test_hydra_config_and_denoiser_override_instantiate():
    ex = instantiate(make_cfg(["xai=freemcg", "xai/denoiser=none"]).xai)
    assert isinstance(ex, FreeMCG) and ex.denoiser is None and not ex.needs_gradients
    assert ex.model_cost((32, 32)) == ModelCost(forward=float(ex.n_particles))
    ex = instantiate(make_cfg(["xai=freemcg", "xai/denoiser=wiener",
                               "xai.n_particles=8"]).xai)
    assert isinstance(ex.denoiser, WienerDenoiser)
    a = ex(linear_model()[0], torch.rand(2, *SHAPE), [0, 1])
    assert a.shape == (2, 8, 8) and np.isfinite(a).all()


@pytest.mark.parametrize(("kwargs", "valid"), [
    ({"output": "probability"}, "log_softmax, logit, softmax"),
    ({"attribution": "signed"}, "abs, gradient, input_x_gradient"),
    ({"n_particles": 1}, "at least 2"),
    ({"sigma": 0.0}, "positive"),
    ({"sigma": float("nan")}, "positive"),
    ({"baseline": "zero"}, "model_mean, mean"),
    ({"denoiser": "ddpm"}, "DiffusersDenoiser"),
])
def test_bad_options_are_refused_with_the_valid_ones(kwargs, valid):
    with pytest.raises(HarnessError, match=valid):
        FreeMCG(**kwargs)


def test_denoiser_with_wrong_output_shape_is_refused():
    ex = FreeMCG(n_particles=4, denoiser=lambda z, s: z[:, :1])
    with pytest.raises(HarnessError, match="shape"):
        ex(linear_model()[0], torch.rand(1, *SHAPE), [0])


def test_diffusers_denoiser_explains_what_is_missing(tmp_path):
    with pytest.raises(HarnessError, match="not a folder.*save_pretrained"):
        DiffusersDenoiser(model_path=str(tmp_path / "nope"))
    with pytest.raises(HarnessError, match="missing .*config.json"):
        DiffusersDenoiser(model_path=str(tmp_path))
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(HarnessError, match="dtype"):
        DiffusersDenoiser(model_path=str(tmp_path), dtype="float8")
