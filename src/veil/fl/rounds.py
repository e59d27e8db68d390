"""How the ServerApp runs one fit round, statistics or training: a bounded wait and the fit workflow.

`RoundTimeoutGrid` bounds the wait for the owners' replies by `round_timeout`; `fit_workflow` is
Flower's default fit step, or SecAgg+'s with the round's public parameters (`secagg_terms`, which owners
check: `veil.fl.terms`), among them `max_weight`, the round's public bound on an owner's weight.
The statistics rounds (`veil.fl.statistics_rounds`) and the training rounds (`veil.fl.serverapp`) both
run through them.
"""

from __future__ import annotations

from typing import Any

from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp.grid import Grid

from veil.fl import preprocessing as prep
from veil.fl.config import FLConfig


class RoundTimeoutGrid(Grid):
    """A Flower `Grid` whose `send_and_receive` waits at most `timeout` seconds unless told otherwise.

    Flower's `DefaultWorkflow` fit step waits for every reply; through this wrapper an owner that crashes
    or hangs is simply missing from the round's replies, and the strategy decides whether enough remain."""

    def __init__(self, grid: Grid, timeout: float | None) -> None:
        self.grid, self.timeout = grid, timeout

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Any:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Any:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Any) -> Any:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        return self.grid.send_and_receive(messages, timeout=self.timeout if timeout is None else timeout)


def secagg_terms(cfg: FLConfig, stage: int | None, rows_bound: float) -> dict[str, Any]:
    """SecAgg+'s public parameters for a round of statistics stage `stage` (None: training), as
    `SecAggPlusWorkflow` keywords: what the ServerApp configures and what every owner requires
    (`veil.fl.terms`). The clipping range is the statistics' fixed range or `cfg.secagg_clip`; owners'
    weights travel inside the masked vectors as weight / `max_weight`, a public bound on every owner's
    weight (`max_weight`)."""
    shares, threshold = cfg.secagg_params()
    return {"num_shares": shares, "reconstruction_threshold": threshold,
            "clipping_range": cfg.secagg_clip if stage is None else prep.STATS_CLIPPING_RANGE,
            "quantization_range": prep.SECAGG_LEVELS, "modulus_range": prep.SECAGG_MODULUS,
            "max_weight": max_weight(cfg, stage, rows_bound)}


def fit_workflow(cfg: FLConfig, stage: int | None, rows_bound: float) -> Any:
    """Flower's SecAgg+ fit workflow for a round of `stage` (None: training) with `secagg_terms`, or None
    without SecAgg+."""
    if not cfg.secagg:
        return None
    return SecAggPlusWorkflow(**secagg_terms(cfg, stage, rows_bound), timeout=cfg.round_timeout or None)


def max_weight(cfg: FLConfig, stage: int | None, rows_bound: float) -> float:
    """SecAgg+'s max_weight for a round: the public upper bound on the row count when owners weigh by
    rows (`FLConfig.row_weighted`), else 1."""
    return float(rows_bound) if cfg.row_weighted(stage) else 1.0
