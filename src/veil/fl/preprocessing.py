"""Federated feature scaling: global mean and scale (or min and max) from owners' aggregated statistics.

No owner may see another's rows, so the statistics themselves are federated. Before training the server
runs three or more statistics rounds through the same Flower fit workflow as training (SecAgg+ when
enabled), each one a FedAvg mean of one vector per owner; from stage 2 on weighted by the owner's row
count n_i (each owner weighs 1 under DP), the first stage always unweighted:

1. magnitude: per feature, whether the owner's root mean square is non-zero, and if so its log2
   (clipped to +-60), and whether the owner's column varies at all (the aggregate tells the server
   which features are constant within every owner, so it does not refine those forever), plus a
   count entry. The ratio of the first two gives a power-of-two reference unit r per feature (four
   times the geometric mean magnitude over the owners, for headroom), so that the next vectors are
   O(1) numbers: SecAgg+ quantizes every value into a fixed range (here +-64 with 2^22 levels, about
   3e-5 resolution), which raw features of very different scales (1e-3 .. 1e3) would not survive.
   The count entry is n_i / B under SecAgg+ with row weights (B the public bound `secagg_max_rows`):
   the server gets N / (K B) for K owners, hence N up to SecAgg+'s rounding and an upper bound on N
   (`rows_upper_bound`) that is the next rounds' public `max_weight`; otherwise (DP: every round
   unweighted) it is 1 / n_i. Either gives c, the power of two nearest the mean rows per owner.
2. moments: per feature mean(x / r) and mean((x / r)^2), plus c / n_i, whose weighted mean is c K / N
   (K owners aggregated): the server derives the total row count N and a first mean m and std s.
   Weighed by rows under SecAgg+, that entry travels as c / max_weight, within range whatever n_i;
   unweighted (DP statistics) an owner holding fewer than c / 64 rows cannot send c / n_i within
   SecAgg+'s range and drops out visibly (for the rest of the run: `veil.fl.terms`).
3. refinement, repeated: mean(u) and mean(u^2) of u = (x - m) / s, which removes the cancellation of
   E[x^2] - E[x]^2 for features whose spread is small against their mean. While some feature's
   variance in these units is below `RESOLVED` (and it is not constant), m and s are updated and
   the round is repeated with s at most 2^-8 of the previous one (at most `MAX_PASSES` rounds in all;
   a feature with spread 1e-6 of its mean needs about three); with DP noise exactly one. For
   min-max scaling the last vector also carries, per feature, the fraction
   of the owner's rows in each of `HIST_BINS` bins of u over [-HIST_RANGE, HIST_RANGE] (plus two
   overflow bins).

Without SecAgg+ (and without DP noise) values travel as exact float64, so one round of stage 2 with
r = 1 gives the moments directly (plus one stage-3 round for min-max's histogram); the variance then
carries float64 cancellation, a relative error of about 1e-16 * (mean / std)^2.

The server then fixes the scaler (center c, scale a per feature: x' = (x - c) / a), sends it to the
owners with every training round, and the exported `veil.ml` model folds it into its weights, so an
encrypted client sends raw features.

SecAgg+ and row counts
----------------------
Flower's SecAgg+ puts each owner's weight inside its masked vector (it sends n_i / max_weight and the
update scaled by it, quantized), so the server recovers only the sum of the weights and of the weighted
vectors. `max_weight` must be public and at least every n_i (a larger n_i would be clipped silently),
and not much larger than N: each owner's weighted vector is quantized with the same absolute step, so
the aggregate's error grows as max_weight / N. The server therefore never looks at an owner's rows to
choose it: the first stage is unweighted and carries n_i / B (B = `secagg_max_rows` of the run config,
which owners read there; an owner with more rows leaves the run visibly), which bounds N from above,
exceeding it by less than 2 K B * 2 * 64 / 2^22 rows; that bound is the max_weight of every later
row-weighted round (the aggregate's error is then that of max_weight = N, about sqrt(K) quantization
steps). Owners check their n_i against SecAgg+'s own max_weight, which the first row-weighted round
fixes for the run (`veil.fl.terms`: no bound an owner checks its rows against can change per round).
Without such a first stage (no statistics, or DP statistics, whose noise would swamp the count) a
count of its own, stage 0 ([n_i / B] unweighted, without noise), precedes training. The reply fields
Flower leaves in clear (`num_examples`, metrics, status) are replaced by constants on the owner
(`veil.fl.clientapp.masked_only_mod`).

What the server learns
----------------------
- `standard` with SecAgg+: only the aggregates above, i.e. per feature the global mean log-magnitude,
  the fraction of owners whose column is non-zero and of owners whose column varies, the mean and
  variance, and the total row count of the owners that answered each round; never one owner's
  statistics or row count. (Owners that drop out of one round but not another change that total:
  the difference is their row count.) From owners' refusals it learns at most at which round each
  owner left the run (`veil.fl.terms`).
- `standard` without SecAgg+: each owner's own stage-2 vector (r = 1), i.e. its row count and per
  feature its mean and mean square (as it would learn each owner's model update without SecAgg+).
- `minmax`: additionally the histogram of every feature over the bins, and the moments around the
  global mean (with SecAgg+ only the aggregate; without it each owner's). The reported min and max
  are the outer edges of the outermost non-empty bins (true values may lie up to one bin width,
  2 * HIST_RANGE / HIST_BINS standard deviations, inside them), and
  values beyond HIST_RANGE standard deviations land in the overflow bins, which clamp the range at
  +-HIST_RANGE standard deviations. Exact per-owner minima and maxima are never sent: a maximum is
  not a sum, and revealing it per owner would leak an extreme row.

With `stats_noise` > 0, Flower's fixed-clipping DP wrapper (server-side clipping, or with SecAgg+
client-side clipping by `fixedclipping_mod`, since the server never sees one owner's vector) clips
each owner's statistics vector to L2 norm `stats_clip` and adds Gaussian noise of standard deviation
`stats_noise * stats_clip / K` to the unweighted mean of the K vectors (each owner weighs 1): one
owner moves that mean by at most `stats_clip / K` (L2 sensitivity), per statistics round; the rounds
compose (see `veil.fl.privacy`; the run reports epsilon for the rounds actually run). Statistics
vectors are O(1) per feature by construction (log-magnitudes are sent divided by 60), so `stats_clip`
near sqrt(3 d) keeps them whole. With few owners the noise std `stats_noise * stats_clip / K` is
large against per-feature statistics: DP statistics make sense for federations of many owners.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.preprocessing import StandardScaler

from veil.errors import FederatedConfigError, FederatedStatisticsError

SCALINGS = ("standard", "minmax", "off")
LOG_CLIP = 60.0
STATS_CLIPPING_RANGE = 64.0
SECAGG_LEVELS = 2 ** 22  # SecAgg+'s quantization levels over [-clipping range, clipping range]
SECAGG_MODULUS = 2 ** 32  # SecAgg+'s masks and sums are taken modulo this (Flower's default)
HIST_BINS = 32
HIST_RANGE = 4.0
MAX_PASSES = 8
RESOLVED = 0.25


def check_rows(n_rows: int, row_bound: float) -> None:
    """Refuse, visibly and without saying by how much, an owner holding more rows than the public bound
    `secagg_max_rows`: its count would exceed every later round's public max_weight."""
    if n_rows > row_bound:
        raise FederatedStatisticsError("this owner holds more rows than the public bound secagg_max_rows")


def owner_stats(X: np.ndarray, stage: int, reference: list[np.ndarray], minmax: bool = False,
                count_unit: float = 1.0, row_bound: float | None = None) -> np.ndarray:
    """One owner's statistics vector for `stage` (0, 1, 2 or 3) given the server's `reference` arrays.

    Stage 0 is the count alone, [n_i / row_bound] (a SecAgg+ run without statistics rounds); stage 1
    takes no reference and ends with n_i / `row_bound` when given, else 1 / n_i; stage 2 takes [r] and
    `count_unit` c (it sends c / n_i, whose weighted mean c K / N is then close to 1, where quantization
    is finest); stage 3 takes [m, s]. References and units of another form than the server's (r and s
    positive, m finite, c a power of two >= 1) are refused whatever the rows."""
    X = np.asarray(X, dtype=np.float64)
    if stage in (0, 1) and row_bound is not None:
        check_rows(len(X), row_bound)  # the count would leave SecAgg+'s range or exceed the public max_weight
    if stage in (2, 3):
        if (len(reference) != stage - 1 or any(len(a) != X.shape[1] or not np.all(np.isfinite(a)) for a in reference)
                or not np.all(reference[-1] > 0)):
            raise FederatedStatisticsError(f"malformed reference for statistics stage {stage}")
        if stage == 2 and not (count_unit >= 1 and math.frexp(count_unit)[0] == 0.5):
            raise FederatedStatisticsError("the count unit must be a power of two >= 1")
    count = [len(X) / row_bound] if row_bound is not None else [1.0 / len(X)]
    if stage == 0:
        if row_bound is None:
            raise FederatedStatisticsError("the count stage needs the public row bound")
        return np.asarray(count)
    if stage == 1:
        rms = np.sqrt(np.mean(X * X, axis=0))
        present = (rms > 0).astype(np.float64)
        with np.errstate(divide="ignore"):
            log_rms = np.where(rms > 0, np.clip(np.log2(np.where(rms > 0, rms, 1.0)), -LOG_CLIP, LOG_CLIP), 0.0)
        varies = (X.max(0) > X.min(0)).astype(np.float64)
        # log-magnitudes in units of LOG_CLIP, so that every statistic is O(1) (DP clipping, SecAgg+ range)
        return np.concatenate([present, log_rms / LOG_CLIP, varies, count])
    if stage == 2:
        z = X / reference[0]
        return np.concatenate([z.mean(0), (z * z).mean(0), [count_unit / len(X)]])
    if stage == 3:
        u = (X - reference[0]) / reference[1]
        parts = [u.mean(0), (u * u).mean(0)]
        if minmax:
            edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
            index = np.clip(np.searchsorted(edges, u, side="right"), 0, HIST_BINS + 1)  # 0 and B+1: overflow
            hist = np.stack([np.bincount(index[:, j], minlength=HIST_BINS + 2) for j in range(X.shape[1])])
            parts.append((hist / len(X)).ravel())
        return np.concatenate(parts)
    raise FederatedStatisticsError(f"unknown statistics stage {stage}")


def stats_size(stage: int, n_features: int, minmax: bool = False) -> int:
    """Length of the vector `owner_stats` returns for `stage`."""
    if stage == 0:
        return 1
    if stage == 1:
        return 3 * n_features + 1
    if stage == 2:
        return 2 * n_features + 1
    return 2 * n_features + (n_features * (HIST_BINS + 2) if minmax else 0)


def reference_unit(aggregate: np.ndarray, row_bound: float | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """Stage 1 (unweighted mean over the owners) -> (r, c, varies): r is four times the power of two
    nearest the mean log-magnitude of the owners holding non-zero values (all-zero features get 1); c
    the power of two nearest the mean rows per owner (N / K from the entries n_i / `row_bound`; without
    a bound the harmonic mean of the n_i from the entries 1 / n_i); `varies` marks features that vary
    within at least one owner."""
    d = (len(aggregate) - 1) // 3
    present, log_sum, count = aggregate[:d], aggregate[d:2 * d], float(aggregate[-1])
    varies = aggregate[2 * d:3 * d] > 1e-9
    per_owner = row_bound * count if row_bound is not None else (1.0 / count if count > 0 else 0.0)
    count_unit = float(np.exp2(np.round(np.log2(per_owner)))) if per_owner >= 1 else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_log = np.where(present > 1e-9, LOG_CLIP * log_sum / np.where(present > 1e-9, present, 1.0), 0.0)
    return np.where(present > 1e-9, np.exp2(np.round(mean_log) + 2), 1.0), count_unit, varies


def rows_upper_bound(count: float, n_owners: int, row_bound: float) -> int:
    """An upper bound on the row count N of `n_owners` owners from the unweighted SecAgg+ mean `count` of
    their n_i / `row_bound` (stage 0 or the last entry of stage 1).

    SecAgg+ rounds each owner's value stochastically to its grid, off by less than one step
    (2 * STATS_CLIPPING_RANGE / SECAGG_LEVELS), so the mean is off by less than one step and
    N = K B * mean by less than K B steps: K B (mean + step) bounds N from above and exceeds it by less
    than 2 K B steps (30 rows with the default B = 10^5 and 5 owners)."""
    step = 2 * STATS_CLIPPING_RANGE / SECAGG_LEVELS
    return max(1, math.ceil(n_owners * row_bound * (count + step)))


NOISE_SIGMAS = 6.0
"""Under DP noise a stage-2 spread is at least the square root of this many standard deviations of
the noise on its variance estimate (`first_moments`)."""


def first_moments(aggregate: np.ndarray, r: np.ndarray, n_owners: int,
                  count_unit: float = 1.0, noise_std: float = 0.0) -> tuple[np.ndarray, np.ndarray, int]:
    """Stage 2 -> (m, s, N): a first mean and spread in raw units, and the total row count.

    `noise_std` is the standard deviation of the DP noise on each aggregate entry (Flower's fixed
    clipping: noise multiplier x clipping norm / owners). The variance E[z^2] - E[z]^2 then carries
    noise of about noise_std (1 + 2 |E[z]|), which can bring a feature's estimate near zero while its
    rows still spread: the refinement's u = (x - m) / s would then leave SecAgg+'s range of +-64 and
    every owner would refuse the round. So s is at least sqrt(NOISE_SIGMAS x that noise): a spread
    the noise swamps is refined at the noise's resolution instead of at a near-zero unit."""
    d = len(r)
    ez, ez2, inv = aggregate[:d], aggregate[d:2 * d], float(aggregate[2 * d])
    var = np.maximum(ez2 - ez * ez, 0.0)
    # a feature with (numerically) no spread: refine around its mean in reference units
    s = np.where(var > 1e-8 * np.maximum(ez2, 1e-300), np.sqrt(var), 1.0)
    if noise_std > 0:
        s = np.maximum(s, np.sqrt(NOISE_SIGMAS * noise_std * (1.0 + 2.0 * np.abs(ez))))
    n_total = round(count_unit * n_owners / inv) if inv > 0 else 0
    return ez * r, s * r, n_total


@dataclass
class FederatedScaler:
    """The global affine scaler x' = (x - center) / scale, as derived from aggregated statistics."""

    kind: str
    center: np.ndarray
    scale: np.ndarray
    n_samples: int
    mean: np.ndarray
    std: np.ndarray

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scale raw features the way every owner does before training."""
        return (np.asarray(X, dtype=np.float64) - self.center) / self.scale

    def sklearn(self) -> StandardScaler:
        """A fitted scikit-learn `StandardScaler` with this center and scale (min-max included: it is the
        same affine map), so `veil.ml.from_sklearn_model` folds it into a linear model's weights."""
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = self.center.copy(), self.scale.copy()
        scaler.var_ = self.scale ** 2
        scaler.n_features_in_ = len(self.center)
        scaler.n_samples_seen_ = self.n_samples
        return scaler

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("center", "scale", "mean", "std"):
            out[key] = np.asarray(out[key]).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FederatedScaler:
        arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("center", "scale", "mean", "std")}
        return cls(data["kind"], n_samples=int(data["n_samples"]), **arrays)

    def pack(self) -> bytes:
        """Center and scale as bytes, to travel in a Flower fit config."""
        return np.concatenate([self.center, self.scale]).astype("<f8").tobytes()

    @staticmethod
    def unpack(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(center, scale) from `pack`'s bytes."""
        values = np.frombuffer(blob, dtype="<f8")
        if len(values) % 2:
            raise FederatedStatisticsError("malformed scaler in the fit config")
        half = len(values) // 2
        return values[:half].copy(), values[half:].copy()


def refine(aggregate: np.ndarray, m: np.ndarray, s: np.ndarray,
           varies: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """A refinement round's aggregate -> (m', s', done): the new center and unit, and whether every
    feature's spread is resolved (variance in units of s at least `RESOLVED`; or the feature is constant
    within every owner and its variance between owners is nil)."""
    d = len(m)
    eu, eu2 = aggregate[:d], aggregate[d:2 * d]
    var = np.maximum(eu2 - eu * eu, 0.0)
    unresolved = (var < RESOLVED) & (varies | (var > 1e-9))
    new_s = np.where(unresolved, s * np.maximum(np.sqrt(var), 2.0 ** -8), np.where(var > 1e-9, s * np.sqrt(var), s))
    return m + s * eu, new_s, not unresolved.any()


def scaler_from_moments(aggregate: np.ndarray, n_owners: int) -> FederatedScaler:
    """A stage-2 aggregate in exact floats (r = 1, c = 1) -> the standard scaler."""
    d = (len(aggregate) - 1) // 2
    mean, ex2, inv = aggregate[:d], aggregate[d:2 * d], float(aggregate[2 * d])
    std = np.sqrt(np.maximum(ex2 - mean * mean, 0.0))
    constant = std <= 1e-8 * np.maximum(np.abs(mean), 1e-300)
    n_total = round(n_owners / inv) if inv > 0 else 0
    return FederatedScaler("standard", mean, np.where(constant, 1.0, std), n_total, mean, std)


def final_scaler(kind: str, aggregate: np.ndarray, m: np.ndarray, s: np.ndarray, n_total: int,
                 n_samples_floor: float = 0.5) -> FederatedScaler:
    """Stage 3 -> the scaler: mean and std from the refined moments; for `minmax`, min and max from the
    outermost non-empty histogram bins."""
    if kind not in SCALINGS or kind == "off":
        raise FederatedConfigError(f"scaling must be 'standard' or 'minmax', got {kind!r}")
    d = len(m)
    eu, eu2 = aggregate[:d], aggregate[d:2 * d]
    mean = m + s * eu
    std = s * np.sqrt(np.maximum(eu2 - eu * eu, 0.0))
    constant = std <= 1e-8 * np.maximum(np.abs(mean), 1e-300)
    if kind == "standard":
        return FederatedScaler(kind, mean, np.where(constant, 1.0, std), n_total, mean, std)
    hist = aggregate[2 * d:].reshape(d, HIST_BINS + 2)
    edges = np.concatenate([[-HIST_RANGE], np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1), [HIST_RANGE]])
    threshold = n_samples_floor / max(n_total, 1)  # half a row: below it a bin is empty up to quantization
    lo, hi = np.empty(d), np.empty(d)
    for j in range(d):
        filled = np.flatnonzero(hist[j] > threshold)
        if len(filled) == 0:
            lo[j] = hi[j] = mean[j]
            continue
        lo[j] = m[j] + s[j] * edges[filled[0]]
        hi[j] = m[j] + s[j] * edges[filled[-1] + 1]
    span = hi - lo
    return FederatedScaler(kind, lo, np.where(span <= 1e-12 * np.maximum(np.abs(lo), 1.0), 1.0, span), n_total,
                           mean, std)


def check_owner_vector(vector: np.ndarray, secagg: bool, weighted_count: bool = False) -> None:
    """Refuse, visibly, a statistics vector SecAgg+ would silently clip (the owner becomes a dropout).

    With `weighted_count` (stage 2 weighed by rows under SecAgg+) the last entry c / n_i is not held to
    the range here: SecAgg+ carries it multiplied by the weight n_i / max_weight, i.e. as c / max_weight,
    which does not depend on n_i (`veil.fl.terms` holds c to the run's max_weight). Refusing c / n_i > 64
    would tell a server that chooses c per owner whether n_i < c / 64."""
    held = vector[:-1] if weighted_count else vector
    if secagg and float(np.max(np.abs(held), initial=0.0)) > STATS_CLIPPING_RANGE:
        raise FederatedStatisticsError(f"a statistic exceeds the SecAgg+ range +-{STATS_CLIPPING_RANGE}: "
                                       "this owner's data is far from the others' in scale, or it holds "
                                       "far fewer rows than the others")
    if not np.all(np.isfinite(vector)):
        raise FederatedStatisticsError("non-finite statistics (NaN or infinity in the owner's features)")


def stats_epsilon(noise: float, rounds: int, delta: float) -> float:
    """Epsilon of `rounds` statistics rounds at noise multiplier `noise` (inf when noise is 0)."""
    from veil.fl.privacy import gaussian_epsilon

    return gaussian_epsilon(noise, rounds, delta) if noise > 0 else math.inf
