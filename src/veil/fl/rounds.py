"""How the ServerApp runs one fit round, statistics or training: a bounded wait and the fit workflow.

`RoundTimeoutGrid` bounds the wait for the owners' replies by `round_timeout`; `fit_workflow` is
Flower's default fit step, or SecAgg+'s with `max_weight`, the round's public bound on an owner's weight.
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


def fit_workflow(cfg: FLConfig, clipping_range: float, max_weight: float) -> Any:
    """Flower's SecAgg+ fit workflow, or None without SecAgg+. Owners' weights travel inside the masked
    vectors as weight / `max_weight`, a public bound on every owner's weight (1 when all weigh 1)."""
    if not cfg.secagg:
        return None
    shares, threshold = cfg.secagg_params()
    return SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, clipping_range=clipping_range,
                              quantization_range=prep.SECAGG_LEVELS, max_weight=max_weight,
                              timeout=cfg.round_timeout or None)


def max_weight(cfg: FLConfig, stage: int | None, rows_bound: int) -> float:
    """SecAgg+'s max_weight for a round: the public upper bound on the row count when owners weigh by
    rows (`FLConfig.row_weighted`), else 1."""
    return float(rows_bound) if cfg.row_weighted(stage) else 1.0
