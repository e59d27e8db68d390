"""(epsilon, delta) accounting of the Gaussian mechanism over rounds."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from veil.fl.privacy import gaussian_epsilon, privacy_report


def _delta_by_integration(eps, mu):
    # privacy loss of N(mu,1) vs N(0,1) is L ~ N(mu^2/2, mu^2); delta(eps) = E[(1 - e^(eps-L))_+]
    dist = stats.norm(mu * mu / 2, mu)
    value, _ = integrate.quad(lambda x: (1 - math.exp(eps - x)) * dist.pdf(x), eps, np.inf)
    return value


@pytest.mark.parametrize(("sigma", "rounds"), [(1.0, 1), (1.0, 5), (3.0, 10), (0.7, 2)])
def test_epsilon_matches_privacy_loss_integral(sigma, rounds):
    eps = gaussian_epsilon(sigma, rounds, 1e-5)
    mu = math.sqrt(rounds) / sigma
    assert _delta_by_integration(eps, mu) == pytest.approx(1e-5, rel=1e-3)


def test_epsilon_monotone_and_report():
    assert gaussian_epsilon(2.0, 5, 1e-5) < gaussian_epsilon(1.0, 5, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)
    assert gaussian_epsilon(0.0, 5, 1e-5) == math.inf
    report = privacy_report("server", 1.0, 0.5, 10, 5, 1e-5)
    assert report.noise_std == pytest.approx(0.05)
    assert report.epsilon == gaussian_epsilon(1.0, 5, 1e-5)
    with pytest.raises(ValueError):
        gaussian_epsilon(1.0, 5, 0.0)
    # two of ten updates dropped in some round: one owner weighs 1/8 of the mean, noise stays sized for 10
    degraded = privacy_report("server", 1.0, 0.5, 10, 5, 1e-5, min_clients_aggregated=8)
    assert degraded.effective_noise_multiplier == pytest.approx(0.8)
    assert degraded.epsilon == gaussian_epsilon(0.8, 5, 1e-5) > report.epsilon
