"""Privacy accounting for Flower's fixed-clipping Gaussian DP wrappers.

Each round the aggregate gets Gaussian noise of standard deviation `noise_multiplier * clipping_norm /
m` on an unweighted mean of `m` clipped updates, so one owner's whole contribution changes it by at
most `clipping_norm / m`: a Gaussian mechanism with noise multiplier sigma per round. T rounds
compose to one Gaussian mechanism with mu = sqrt(T) / sigma (Gaussian DP), converted to (epsilon,
delta) exactly (Balle & Wang 2018). Sampling amplification is not claimed, so the bound also holds
when only some owners train each round. When a round averages only m' < m updates (dropouts, rejected
updates) one owner moves the mean by C/m' while the noise stays sigma*C/m: the effective multiplier
sigma*m'/m of the worst round is used for every round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from scipy.special import log_ndtr, ndtr

from veil.errors import FederatedConfigError


def _delta(eps: float, mu: float) -> float:
    # e^eps * Phi(x) as exp(eps + log Phi(x)): e^eps alone overflows for the large epsilons of weak noise
    return float(ndtr(-eps / mu + mu / 2) - math.exp(eps + float(log_ndtr(-eps / mu - mu / 2))))


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Smallest epsilon such that `rounds` Gaussian mechanisms with this multiplier are (eps, delta)-DP."""
    if not 0 < delta < 1:
        raise FederatedConfigError("delta must be in (0, 1)")
    if noise_multiplier <= 0:
        return math.inf
    mu = math.sqrt(rounds) / noise_multiplier
    if _delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _delta(hi, mu) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _delta(mid, mu) > delta else (lo, mid)
    return hi


@dataclass
class PrivacyReport:
    """Client-level DP guarantee of a finished run, and the parameters it follows from."""

    mode: str
    noise_multiplier: float
    clipping_norm: float
    clients_per_round: int
    rounds: int
    noise_std: float
    delta: float
    epsilon: float
    min_clients_aggregated: int
    effective_noise_multiplier: float

    def to_dict(self) -> dict:
        return asdict(self)


def privacy_report(mode: str, noise_multiplier: float, clipping_norm: float, clients_per_round: int,
                   rounds: int, delta: float, min_clients_aggregated: int | None = None) -> PrivacyReport:
    """(epsilon, delta) for `rounds` rounds of fixed-clipping Gaussian DP with noise calibrated to
    `clients_per_round` owners, of which at least `min_clients_aggregated` were averaged each round."""
    m_min = clients_per_round if min_clients_aggregated is None else min_clients_aggregated
    effective = noise_multiplier * m_min / clients_per_round
    return PrivacyReport(mode, noise_multiplier, clipping_norm, clients_per_round, rounds,
                         noise_multiplier * clipping_norm / clients_per_round, delta,
                         gaussian_epsilon(effective, rounds, delta), m_min, effective)
