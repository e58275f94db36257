"""Max-sensitivity, eMPRT and the random logit test: known answers, and equality with Quantus
0.6.0 where it computes the same thing."""

import numpy as np
import pytest
import torch

from harness.evaluation.randomisation import EfficientMPRT, RandomLogit, entropy, randomised
from harness.evaluation.robustness import MaxSensitivity
from harness.evaluation.stage import evaluate
from harness.xai.stage import explain
from harness.xai.gradients import Saliency
from test_faithfulness_metrics import conv_model, data, quantus_call
from test_metrics import contributions, linear_model


def grey(model, x, t):
    """An explanation that ignores the model and the class: the image's channel sum."""
    return x.detach().sum(1).numpy()


def saliency(model, x, t):
    """The saliency maps of ``x``, as a run's explain function computes them."""
    return explain(Saliency(), model, torch.as_tensor(x), torch.as_tensor(t), 64, progress=False)


def for_quantus(fn):
    """``fn`` as a Quantus ``explain_func`` (maps with a channel axis)."""
    return lambda model, inputs, targets, **_: fn(model, inputs, targets)[:, None]


def test_max_sensitivity_by_hand():
    model = linear_model()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 2])
    ms = MaxSensitivity(nr_samples=4, radius=0.1)
    a = grey(model, x, t)
    noise = ms.noise(x)  # [S, N, C, H, W]
    expected = np.linalg.norm(noise.sum(2).reshape(4, 3, -1), axis=2).max(0) / np.linalg.norm(a.reshape(3, -1), axis=1)
    np.testing.assert_allclose(ms(model, x, a, t, explain=grey).scores["max_sensitivity"], expected, rtol=1e-5)
    const = lambda m, xx, tt: np.ones((len(xx), 8, 8))  # noqa: E731
    np.testing.assert_array_equal(ms(model, x, np.ones((3, 8, 8)), t, explain=const).scores["max_sensitivity"], 0)
    zero = lambda m, xx, tt: np.zeros((len(xx), 8, 8))  # noqa: E731
    assert np.isnan(ms(model, x, np.zeros((3, 8, 8)), t, explain=zero).scores["max_sensitivity"]).all()
    single = ms(model, x[1:2], a[1:2], t[1:2], explain=grey).scores["max_sensitivity"][0]
    assert single == pytest.approx(expected[1], rel=1e-6)  # the noise does not depend on the batch


def test_max_sensitivity_equals_quantus_for_the_same_noise():
    import quantus

    model = conv_model()
    x, _, t = data(n=3)
    a = saliency(model, x, t)
    ms = MaxSensitivity(nr_samples=3, radius=0.1)
    ours = ms(model, x, a, t, explain=saliency).scores["max_sensitivity"]
    noise = iter(ms.noise(x))

    def same_noise(arr, indices, **_):
        return arr + next(noise).reshape(arr.shape).astype(arr.dtype)

    theirs = quantus_call(quantus.MaxSensitivity(nr_samples=3, perturb_func=same_noise, disable_warnings=True),
                          model, x, a, t, explain_func=for_quantus(saliency))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_emprt_equals_quantus_and_is_zero_for_a_model_blind_explanation():
    import quantus

    model = conv_model()
    x, _, t = data(n=3)
    a = saliency(model, x, t)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    ours = EfficientMPRT()(model, x, a, t, explain=saliency).scores["emprt"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert torch.equal(state, torch.random.get_rng_state())  # and the global RNG too
    theirs = quantus_call(quantus.EfficientMPRT(complexity_func_kwargs={"n_bins": 100}, disable_warnings=True),
                          model, x, a, t, explain_func=for_quantus(saliency))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    np.testing.assert_allclose(EfficientMPRT()(model, x, grey(model, x, t), t, explain=grey).scores["emprt"], 0.0)
    rand = randomised(model, 42)
    assert not torch.equal(rand.net[0].weight, model.net[0].weight)
    assert entropy(np.ones((8, 8)), 10) == 0.0


def test_random_logit_known_answers_and_quantus_with_two_classes():
    import quantus

    model = linear_model(classes=2)
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 1, 0])
    rl = RandomLogit()
    blind = rl(model, x, grey(model, x, t), t, explain=grey).scores["random_logit"]
    np.testing.assert_allclose(blind, 1.0)  # the map does not change with the class: SSIM 1
    exact = lambda m, xx, tt: contributions(m, torch.as_tensor(xx), torch.as_tensor(tt)).numpy()  # noqa: E731
    a = exact(model, x, t)
    ours = rl(model, x, a, t, explain=exact).scores["random_logit"]
    assert (ours < 0.9).all()
    # With two classes the other class is determined, so Quantus must compare the same two maps
    # (one image per call: Quantus normalises by the batch's maximum). Quantus takes the SSIM of
    # the flattened maps (a 1-D window); ours is the 2-D SSIM of the images.
    from quantus.functions.similarity_func import ssim

    b = exact(model, x, 1 - t)
    norm = lambda m: m / np.abs(m).max()  # noqa: E731
    for i in range(4):
        theirs = quantus_call(quantus.RandomLogit(num_classes=2, disable_warnings=True), model, x[i : i + 1],
                              a[i : i + 1], t[i : i + 1],
                              explain_func=for_quantus(exact))
        assert theirs[0] == pytest.approx(ssim(norm(a[i]).ravel(), norm(b[i]).ravel()), abs=1e-6)
        assert ours[i] == pytest.approx(ssim(norm(a[i]), norm(b[i])), abs=1e-6)
    other = rl.other_classes(torch.rand(50, 3, 4, 4), torch.zeros(50, dtype=torch.long), 5)
    assert (other != 0).all() and set(other.tolist()) == {1, 2, 3, 4}


def test_evaluate_hands_the_explainer_to_metrics_that_re_explain():
    model = linear_model()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 1])
    res = evaluate({"ms": MaxSensitivity(nr_samples=2)}, model, x, grey(model, x, t), t, None, explain_fn=grey)
    assert np.isfinite(res["ms"].scores["max_sensitivity"]).all()
