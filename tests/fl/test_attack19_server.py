"""Attack review of issue 19's federated privacy (second round): a curious federated server under
SecAgg+ that writes its own ServerApp (its own strategy and fit configs) against honest owners.

Each test either passes (the defence holds: kept as a regression test) or is a strict xfail (a
finding, reproduced). In-process grid (`veil.fl.inprocess`), the wine owners of test_server_view."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from veil.fl.clientapp import make_client_app
from veil.fl.config import FLConfig, resolve_task
from veil.fl.inprocess import InProcessGrid
from veil.fl.preprocessing import SECAGG_LEVELS

from .test_server_view import OWNERS, SIZES, SKEW, _sizes

pytestmark = pytest.mark.timeout(300)


class PerOwnerConfig(FedAvg):
    """The curious server's strategy: every owner in every round, each with a fit config of its own."""

    def __init__(self, configs: dict[int, dict], weights) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=OWNERS, min_available_clients=OWNERS,
                         initial_parameters=ndarrays_to_parameters(weights))
        self.configs = configs

    def configure_fit(self, server_round, parameters, client_manager):
        clients = client_manager.sample(num_clients=OWNERS, min_num_clients=OWNERS)
        return [(c, FitIns(parameters, dict(self.configs[int(c.node_id)]))) for c in clients]


def _secagg_round(grid: InProcessGrid, cfg: FLConfig, configs: dict[int, dict]) -> dict[int, bool]:
    """One SecAgg+ training round with per-owner fit configs (Flower's own workflow, a public
    max_weight of 1000 rows); which owners answered the masked-vector stage without an error."""
    answered: dict[int, bool] = {}
    send_and_receive = grid.send_and_receive

    def record(messages, *, timeout=None):
        replies = list(send_and_receive(messages, timeout=timeout))
        for reply in replies:
            answered[int(reply.metadata.src_node_id)] = not reply.has_error()
        return replies

    grid.send_and_receive = record
    try:
        learner = cfg.learner(resolve_task(cfg, None))
        context = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=cfg.to_run_config())
        strategy = PerOwnerConfig(configs, learner.get_weights())
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        shares, threshold = cfg.secagg_params()
        workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                                      clipping_range=cfg.secagg_clip, quantization_range=SECAGG_LEVELS,
                                      max_weight=1000.0)
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)
    finally:
        grid.send_and_receive = send_and_receive
    return answered  # the last stage's replies overwrite the earlier ones: masked vectors or their errors


@pytest.mark.xfail(strict=True, reason=(
    "finding: under SecAgg+ an owner refuses (an error reply, visible per owner) when its rows exceed the "
    "fit config's 'veil-max-weight', a value the server chooses per owner and per round; binary search over "
    "7 rounds gives the server every owner's exact row count [2, 17, 17, 36, 70]"))
def test_a_server_choosing_max_weight_per_owner_cannot_learn_the_counts():
    assert _sizes() == SIZES
    cfg = FLConfig(**{**SKEW, "secagg": True})
    grid = InProcessGrid(make_client_app(cfg), OWNERS, cfg.to_run_config())
    lo = dict.fromkeys(grid.node_ids, 0)  # each owner's count is in (lo, hi]
    hi = dict.fromkeys(grid.node_ids, 128)
    try:
        for _ in range(7):
            mid = {n: (lo[n] + hi[n]) // 2 for n in grid.node_ids}
            answered = _secagg_round(grid, cfg, {n: {"veil-max-weight": float(mid[n])} for n in grid.node_ids})
            for n in grid.node_ids:
                if answered.get(n):
                    hi[n] = mid[n]  # rows <= max_weight
                else:
                    lo[n] = mid[n]
    finally:
        grid.close()
    learned = sorted(hi[n] for n in grid.node_ids if hi[n] - lo[n] == 1)
    assert learned != SIZES, f"the server learned every owner's row count: {learned}"


def test_under_secagg_owners_ignore_a_config_that_asks_for_statistics_in_clear():
    """A statistics request (`veil-task: stats`) outside a SecAgg+ round, as a plain fit message, is
    refused like every other message in clear (the vector would carry the owner's own moments)."""
    from flwr.common import FitIns as Ins
    from flwr.compat.common import recorddict_compat as compat

    cfg = FLConfig(**{**SKEW, "secagg": True})
    grid = InProcessGrid(make_client_app(cfg), OWNERS, cfg.to_run_config())
    try:
        weights = cfg.learner(resolve_task(cfg, None)).get_weights()
        config = {"veil-task": "stats", "veil-stage": 2, "veil-reference": np.ones(13).astype("<f8").tobytes(),
                  "veil-count-unit": 1.0, "veil-max-weight": 1000.0}
        content = compat.fitins_to_recorddict(Ins(ndarrays_to_parameters(weights), config), True)
        replies = grid.send_and_receive([grid.create_message(content, "train", n, "1") for n in grid.node_ids])
    finally:
        grid.close()
    assert len(replies) == OWNERS and all(reply.has_error() for reply in replies)
