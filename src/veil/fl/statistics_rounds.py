"""The statistics rounds the ServerApp runs before training: the server side of `veil.fl.preprocessing`.

`federated_statistics` runs the stages of `veil.fl.preprocessing` (magnitudes, moments, refinements; one
exact float64 round without SecAgg+ or DP noise) and returns the federated scaler; `federated_count` is
the secure row count that precedes training under SecAgg+ when no statistics stage counted rows. Each
is one or more `statistics_round`s: a fit round whose config says `veil-task: stats`, answered by
`OwnerClient` with its statistics vector, aggregated by FedAvg (with the statistics' DP noise when
asked) through the same fit workflow as training (`veil.fl.rounds`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp.grid import Grid

from veil.errors import FederationError
from veil.fl import preprocessing as prep
from veil.fl.config import FLConfig
from veil.fl.preprocessing import FederatedScaler
from veil.fl.rounds import fit_workflow
from veil.fl.strategies import build_stats_strategy


def statistics_round(grid: Grid, context: Context, cfg: FLConfig, stage: int, config: dict[str, Any], size: int,
                     rows_bound: int, name: str) -> tuple[np.ndarray, int, list[dict[str, Any]]]:
    """One statistics round named `name`: every owner's vector of length `size` for `stage` of
    `veil.fl.preprocessing` (`config` goes into the fit config), through SecAgg+ when `cfg.secagg`, with
    the statistics' DP noise except for the row count (stage 0); returns (the aggregate, the number of
    owners aggregated, the updates dropped)."""
    config = {"veil-task": "stats", "veil-stage": stage, **config}
    strategy = build_stats_strategy(cfg, size, lambda _rnd: dict(config), noise=stage > 0)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    workflow = fit_workflow(cfg, stage, rows_bound)
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    if strategy.last is None:
        raise FederationError(f"statistics round {name}: no owner's statistics could be aggregated")
    return strategy.last[0], strategy.aggregated[-1], [{**row, "round": name} for row in strategy.rejected]


def federated_count(grid: Grid, context: Context, cfg: FLConfig) -> tuple[int, list[dict[str, Any]]]:
    """Under SecAgg+ without statistics rounds that count rows (`scaling="off"`, or DP statistics): one
    unweighted SecAgg+ round of n_i / B (B = `cfg.secagg_max_rows`, public) -> (an upper bound on the
    federation's row count, to be the training rounds' public max_weight; the updates dropped). See
    `preprocessing.rows_upper_bound`. It carries no DP noise (`stats_noise` does not cover it): the
    server learns the total row count, and nothing per owner."""
    vector, owners, rejected = statistics_round(grid, context, cfg, 0, {}, prep.stats_size(0, 0), 0, "count")
    return prep.rows_upper_bound(float(vector[0]), owners, cfg.secagg_max_rows), rejected


def federated_statistics(grid: Grid, context: Context, cfg: FLConfig,
                         n_features: int) -> tuple[FederatedScaler, dict[str, Any]]:
    """Run the statistics rounds of `veil.fl.preprocessing` (through SecAgg+ when `cfg.secagg`) and
    return the federated scaler with a summary (rounds, owners aggregated, total rows, wall time).

    Under SecAgg+ with row weights the first stage also counts rows (unweighted, n_i / `secagg_max_rows`):
    its upper bound on the row count (`rows_bound` in the summary) is the public max_weight of the later
    statistics rounds and of training, so the server chooses it without seeing any owner's count."""
    start = time.perf_counter()
    minmax = cfg.scaling == "minmax"
    bound = cfg.count_bound(1)
    reference: list[np.ndarray] = []
    aggregated, rejected = [], []
    m = s = r = np.zeros(n_features)
    varies = np.ones(n_features, dtype=bool)
    n_total, rows_bound, count_unit, done = 0, 0, 1.0, False
    exact = not cfg.secagg and cfg.stats_noise == 0  # float64 end to end: no magnitude or refinement rounds
    if exact:
        reference = [np.ones(n_features)]
    stage = 0
    while not done:
        stage += 1
        step = min(stage + 1, 3) if exact else min(stage, 3)
        blob = np.concatenate(reference).astype("<f8").tobytes() if reference else b""
        config: dict[str, Any] = {"veil-reference": blob, "veil-count-unit": count_unit}
        vector, owners, dropped = statistics_round(grid, context, cfg, step, config,
                                                   prep.stats_size(step, n_features, minmax), rows_bound,
                                                   f"stats-{stage}")
        aggregated.append(owners)
        rejected.extend(dropped)
        if step == 1:
            r, count_unit, varies = prep.reference_unit(vector, bound)
            if bound is not None:
                rows_bound = prep.rows_upper_bound(float(vector[-1]), owners, bound)
            reference = [r]
        elif step == 2 and exact:
            scaler = prep.scaler_from_moments(vector, owners)
            n_total, done = scaler.n_samples, not minmax
            m, s = scaler.mean, np.where(scaler.std > 0, scaler.std, 1.0)
            reference = [m, s]
        elif step == 2:
            noise_std = cfg.stats_noise * cfg.stats_clip / owners if cfg.stats_noise > 0 and owners else 0.0
            m, s, n_total = prep.first_moments(vector, r, owners, count_unit, noise_std)
            reference = [m, s]
        else:
            scaler = prep.final_scaler(cfg.scaling, vector, m, s, n_total)
            m, s, done = prep.refine(vector, m, s, varies)
            # under DP every round costs privacy and noise would keep features "unresolved": one refinement
            done = done or exact or cfg.stats_noise > 0 or stage >= prep.MAX_PASSES
            reference = [m, s]
    summary = {"rounds": stage, "owners_aggregated": aggregated, "n_samples": n_total, "rows_bound": rows_bound,
               "wall_time": time.perf_counter() - start, "rejected": rejected, "secagg": cfg.secagg,
               "noise_multiplier": cfg.stats_noise, "clipping_norm": cfg.stats_clip if cfg.stats_noise else None}
    if cfg.stats_noise > 0:
        summary["epsilon"] = prep.stats_epsilon(cfg.stats_noise, stage, cfg.delta)
        summary["delta"] = cfg.delta
    return scaler, summary
