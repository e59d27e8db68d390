"""The server's side: the `ServerApp` that runs the statistics rounds, then the training rounds.

`make_server_app` builds the app from a configuration (or, on the deployment engine, from each run's
config). A run: the federated scaler from the statistics rounds (`veil.fl.statistics_rounds`; unless
`scaling="off"`, or restored from a checkpoint with `resume`), under SecAgg+ a secure row count when no
statistics stage counted rows, then `rounds` rounds of the strategy (`veil.fl.strategies`) through the
fit workflow of `veil.fl.rounds`, each round's wait bounded by `RoundTimeoutGrid`. After each round the
global model is evaluated on the server's held-out rows, the row appended to the progress log and the
checkpoint written (`veil.fl.checkpoint`); the `FLResult` goes to `on_result` and the output directory.

The server app never holds an owner's rows: it gets the configuration, its own held-out set and the
task's public description (`Task`: feature count and label set), and under SecAgg+ it learns row counts
only as sums inside the secure aggregate (see `veil.fl.clientapp.masked_only_mod` and
`veil.fl.preprocessing`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow

from veil.errors import FederatedConfigError, FederationError
from veil.fl.checkpoint import append_progress, load_checkpoint, save_checkpoint, save_result
from veil.fl.config import FLConfig, FLResult, Task, config_source, held_out_view, resolve_task
from veil.fl.privacy import privacy_report
from veil.fl.rounds import RoundTimeoutGrid, fit_workflow, max_weight
from veil.fl.statistics_rounds import federated_count, federated_statistics
from veil.fl.strategies import build_strategy


def make_server_app(config: FLConfig | None = None, test: tuple[np.ndarray, np.ndarray] | None = None,
                    task: Task | None = None, on_round: Callable[[dict], None] | None = None,
                    on_result: Callable[[FLResult], None] | None = None,
                    on_error: Callable[[BaseException], None] | None = None) -> ServerApp:
    """The `ServerApp`: federated statistics and scaler (unless `scaling="off"`), then `rounds` rounds of
    the strategy (through SecAgg+ if asked), evaluating the global model on the server's held-out set
    after each round, checkpointing it when `checkpoint_dir` is set, and reporting a result.

    It takes no owner's rows: `test` is the server's own held-out set and `task` the public task
    description (both default to the named dataset's held-out split and description, `data.held_out`).
    Under SecAgg+ with row weights, the public max_weight comes from a secure count (first statistics
    stage, or `federated_count`), never from the owners' partitions.

    With `resume` (a checkpoint directory) the scaler, history and global model come from the
    checkpoint and training continues after its last completed round. `on_error` receives any
    exception that stops the run (engines that call `sys.exit` would otherwise lose it)."""
    resolve = config_source(config)
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Context) -> None:
        try:
            _run_federation(resolve(context), grid, context, test, task, on_round, on_result)
        except BaseException as exc:
            if on_error is not None:
                on_error(exc)
            raise

    return app


def _run_federation(cfg: FLConfig, grid: Any, context: Context, test: tuple[np.ndarray, np.ndarray] | None,
                    task: Task | None, on_round: Callable[[dict], None] | None,
                    on_result: Callable[[FLResult], None] | None) -> None:
    start = time.perf_counter()
    grid = RoundTimeoutGrid(grid, cfg.round_timeout or None)
    task = resolve_task(cfg, task)
    if test is None:
        view = held_out_view(cfg)
        test = (view.X, view.y)
    X_test, y_test = test
    learner = cfg.learner(task)
    result = FLResult(cfg, weights=learner.get_weights(), n_features=task.n_features,
                      classes=None if task.classes is None else task.classes.tolist())
    done, n_total, rows_bound = 0, 0, 0
    if cfg.resume:
        saved = load_checkpoint(Path(cfg.resume))
        result.weights, result.history, result.scaler = saved.weights, saved.history, saved.scaler
        result.statistics, result.rejected = saved.statistics, saved.rejected
        done = int(saved.history[-1]["round"]) if saved.history else 0
        n_total = int((saved.statistics or {}).get("n_samples", 0))
        rows_bound = int((saved.statistics or {}).get("rows_bound", 0))
    elif cfg.scaling != "off":
        result.scaler, result.statistics = federated_statistics(grid, context, cfg, task.n_features)
        n_total, rows_bound = result.statistics["n_samples"], result.statistics["rows_bound"]
        result.rejected.extend(result.statistics.pop("rejected"))
    if cfg.secagg and cfg.row_weighted() and not rows_bound:
        rows_bound, dropped = federated_count(grid, context, cfg)
        result.rejected.extend(dropped)
    X_eval = result.transform(X_test)
    fit_extra: dict[str, Any] = {}
    if result.scaler is not None:
        fit_extra["veil-scaler"] = result.scaler.pack()
    if n_total:
        fit_extra["veil-total"] = n_total
    if cfg.secagg and cfg.row_weighted():
        fit_extra["veil-max-weight"] = float(rows_bound)
    remaining = cfg.rounds - done
    if remaining <= 0:
        raise FederatedConfigError(f"the checkpoint already holds {done} rounds; ask for more than {cfg.rounds}")

    def evaluate_fn(server_round: int, weights: list[np.ndarray], _: dict) -> tuple[float, dict]:
        if server_round > len(strategy.aggregated):
            # Flower's SecAgg+ workflow ends a round without calling the strategy when too few owners answer
            raise FederationError(f"round {done + server_round}: no aggregate (SecAgg+ stopped: fewer owners "
                                  "answered than its reconstruction threshold)")
        learner.set_weights(weights)
        loss, metrics = learner.evaluate(X_eval, y_test)
        result.weights = [np.array(w) for w in weights]
        result.round_weights.append(result.weights)
        if done and server_round == 0:
            return loss, metrics  # the resumed model was evaluated before the interruption
        row = {"round": done + server_round, "loss": loss, **metrics, "time": time.perf_counter() - start}
        result.history.append(row)
        if cfg.out_dir:
            append_progress(Path(cfg.out_dir), row)
        if cfg.checkpoint_dir:
            result.rejected = [*kept, *strategy.rejected]
            save_checkpoint(result, Path(cfg.checkpoint_dir))
        if on_round is not None:
            on_round(row)
        return loss, metrics

    kept = list(result.rejected)
    strategy = build_strategy(cfg, result.weights, evaluate_fn,
                              lambda rnd: {"server_round": done + rnd, **fit_extra})
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=remaining), strategy=strategy)
    workflow = fit_workflow(cfg, cfg.secagg_clip, max_weight(cfg, None, rows_bound))
    DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    result.rejected = [*kept, *strategy.rejected]
    if cfg.dp != "off":
        result.privacy = privacy_report(cfg.dp, cfg.noise_multiplier, cfg.clipping_norm, cfg.min_fit(cfg.fraction_fit),
                                        cfg.rounds, cfg.delta, min(strategy.aggregated, default=cfg.clients))
    result.wall_time = time.perf_counter() - start
    if on_result is not None:
        on_result(result)
    if cfg.out_dir:
        save_result(result, Path(cfg.out_dir))
