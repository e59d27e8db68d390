"""What the federated server receives: under SecAgg+ no owner's row count, metric or statistic in clear,
and the server app never reads the owners' rows (docs/fl.md, "What the server receives under `--secagg`").
In-process grid."""

import random
import re
import sys
from typing import ClassVar

import numpy as np
import pytest
from flwr.common import EvaluateIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from veil.errors import FederatedConfigError, FederationError
from veil.fl import clientapp, strategies, terms
from veil.fl.clientapp import make_client_app
from veil.fl.config import FLConfig
from veil.fl.data import load_dataset
from veil.fl.inprocess import InProcessGrid, run_server_app
from veil.fl.learners import SklearnLearner, make_learner
from veil.fl.partition import partition
from veil.fl.preprocessing import SECAGG_LEVELS, STATS_CLIPPING_RANGE
from veil.fl.simulation import run_simulation

pytestmark = pytest.mark.timeout(300)

OWNERS = 5
SKEW = {"dataset": "wine", "clients": OWNERS, "partition": "dirichlet", "alpha": 0.3, "rounds": 2}
SIZES = [2, 17, 17, 36, 70]  # the owners' rows under SKEW
PROTOCOL_KEYS = {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
                 Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST}
LEGACY = {"fitres.metrics", "fitres.status", "fitres.num_examples", "fitres.parameters"}


def _sizes():
    wine = load_dataset("wine")
    parts = partition(wine.X_train, wine.y_train, OWNERS, "dirichlet", 0.3, 0)
    return sorted(len(p[1]) for p in parts)


def _observe(monkeypatch, **settings):
    """Run SKEW with `settings`; return (what aggregate_fit received, every reply the grid handed the server
    side, the result)."""
    at_strategy, replies = [], []
    aggregate_fit = strategies.ValidatingMixin.aggregate_fit

    def spy(self, server_round, results, failures):
        at_strategy.append([(res.num_examples, dict(res.metrics), res.status, res.parameters.tensors)
                            for _, res in results])
        return aggregate_fit(self, server_round, results, failures)

    send_and_receive = InProcessGrid.send_and_receive

    def record(self, messages, *, timeout=None):
        out = list(send_and_receive(self, messages, timeout=timeout))
        replies.extend(out)
        return out

    monkeypatch.setattr(strategies.ValidatingMixin, "aggregate_fit", spy)
    monkeypatch.setattr(InProcessGrid, "send_and_receive", record)
    result = run_simulation(FLConfig(**{**SKEW, "secagg": True, **settings}), engine="inprocess")
    return at_strategy, replies, result


def _clear_records(reply):
    """Every record of a reply except SecAgg+'s own protocol record, by name."""
    content = reply.content
    records = {**content.config_records, **content.metric_records, **content.array_records}
    return {name: record for name, record in records.items() if name != RECORD_KEY_CONFIGS}


SECAGG_RUNS = {
    "secagg": {},
    "secagg-dp-client": {"dp": "client", "noise_multiplier": 0.1, "clipping_norm": 1.0},
    "secagg-stats-noise": {"stats_noise": 0.002, "stats_clip": 8.0},
    "secagg-no-statistics": {"scaling": "off"},
    "secagg-minmax": {"scaling": "minmax"},
}


@pytest.mark.parametrize("settings", SECAGG_RUNS.values(), ids=SECAGG_RUNS.keys())
def test_under_secagg_the_server_receives_no_per_owner_count(monkeypatch, settings):
    """Every statistics and training round: the strategy gets one FitRes per owner with the same constant
    count, no metrics and the one aggregate; the grid hands the server side nothing else in clear."""
    assert _sizes() == SIZES  # very unequal owners: a leaked count would show
    at_strategy, replies, result = _observe(monkeypatch, **settings)
    rounds = (result.statistics or {}).get("rounds", 0) + SKEW["rounds"]
    assert len(at_strategy) >= rounds
    for results in at_strategy:
        assert len(results) == OWNERS
        assert {count for count, *_ in results} == {1}
        assert all(metrics == {} for _, metrics, *_ in results)
        assert len({(status.code, status.message) for *_, status, _ in results}) == 1
        assert all(tensors == results[0][3] for *_, tensors in results)  # the aggregate, for every owner
    assert replies and not any(reply.has_error() for reply in replies)
    legacy = []
    for reply in replies:
        assert set(reply.content.config_records[RECORD_KEY_CONFIGS]) <= PROTOCOL_KEYS
        clear = _clear_records(reply)
        assert set(clear) <= LEGACY
        assert all(len(record) == 0 for name, record in clear.items() if name == "fitres.parameters")
        if clear:
            legacy.append({name: dict(record) for name, record in clear.items() if name != "fitres.parameters"})
    assert len(legacy) == OWNERS * len(at_strategy)  # one masked-vector reply per owner and round
    assert all(fields == legacy[0] for fields in legacy)  # constants: the same for every owner and round
    assert legacy[0]["fitres.num_examples"] == {"num_examples": 1} and legacy[0]["fitres.metrics"] == {}
    assert np.abs(result.weights[0]).max() > 0.05 and result.rejected == []  # every owner trained the model


def test_under_secagg_counts_still_weigh_inside_the_secure_sum(monkeypatch):
    """The SecAgg+ aggregate is the row-weighted mean that the server computes without SecAgg+ (where it
    sees each count), far from the unweighted mean of these very unequal owners; the public max_weight
    (an upper bound on all rows, from the first statistics stage) is close to N."""
    secure = _observe(monkeypatch)[2]
    updates = []
    aggregate_fit = strategies.ValidatingMixin.aggregate_fit

    def spy(self, server_round, results, failures):
        updates.append([(res.num_examples, parameters_to_ndarrays(res.parameters)) for _, res in results])
        return aggregate_fit(self, server_round, results, failures)

    monkeypatch.setattr(strategies.ValidatingMixin, "aggregate_fit", spy)
    plain = run_simulation(FLConfig(**SKEW), engine="inprocess")
    assert secure.statistics["n_samples"] == plain.statistics["n_samples"] == sum(SIZES)
    step = 2 * STATS_CLIPPING_RANGE / SECAGG_LEVELS
    slack = 2 * OWNERS * FLConfig().secagg_max_rows * step
    assert sum(SIZES) <= secure.statistics["rows_bound"] <= sum(SIZES) + slack
    np.testing.assert_allclose(secure.scaler.mean, plain.scaler.mean, rtol=1e-3)
    first = updates[plain.statistics["rounds"]]  # the first training round, in clear
    assert sorted(n for n, _ in first) == SIZES
    unweighted = [np.mean([arrays[i] for _, arrays in first], axis=0) for i in range(len(first[0][1]))]
    for a, b, c in zip(secure.round_weights[1], plain.round_weights[1], unweighted, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert np.abs(b - c).max() > 1e-2
    assert secure.accuracy() == pytest.approx(plain.accuracy(), abs=0.03)


def test_an_owner_beyond_the_public_bound_leaves_the_run_visibly(monkeypatch):
    """Owners with more rows than `secagg_max_rows` refuse their first message and then leave the run:
    listed as dropped in every later round with a fixed reason (never clipped silently, never back once
    the secure count would admit them), and no reason carries a row count."""
    _, _, result = _observe(monkeypatch, secagg_max_rows=35)
    reasons = [(row["round"], row["reason"]) for row in result.rejected]
    assert sum("secagg_max_rows" in reason for rnd, reason in reasons if rnd == "stats-1") == 2  # 36 and 70 rows
    later = [f"stats-{k}" for k in range(2, result.statistics["rounds"] + 1)] + [1, 2]
    assert all(sum(terms.LEFT in reason for rnd, reason in reasons if rnd == name) == 2 for name in later)
    assert len(reasons) == 2 * (1 + len(later))
    assert not any(re.search(r"\b(36|70)\b", reason) for _, reason in reasons)
    assert result.statistics["n_samples"] == sum(SIZES) - 70 - 36  # the owners that stayed


def test_under_secagg_an_owner_refuses_to_answer_in_clear():
    """An evaluation request (answered with a loss, a count and metrics) gets an error under SecAgg+;
    without SecAgg+ the same owner answers it."""
    wine = load_dataset("wine")
    model = make_learner("logreg", wine.X_train.shape[1], wine.classes)
    content = compat.evaluateins_to_recorddict(EvaluateIns(ndarrays_to_parameters(model.get_weights()), {}), True)
    answers = {}
    for secagg in (True, False):
        cfg = FLConfig(dataset="wine", clients=2, secagg=secagg)
        grid = InProcessGrid(make_client_app(cfg), 2, cfg.to_run_config())
        try:
            msg = grid.create_message(content, "evaluate", grid.node_ids[0], "1")
            (answers[secagg],) = grid.send_and_receive([msg])
        finally:
            grid.close()
    assert answers[True].has_error() and "only SecAgg+ training messages" in answers[True].error.reason
    assert not answers[False].has_error()
    n = compat.recorddict_to_evaluateres(answers[False].content).num_examples
    assert n == len(partition(wine.X_train, wine.y_train, 2, "iid", 0.5, 0)[0][1])


def _side():
    """Which side the caller runs on: "owner" inside an owner's `client_fn` (on the in-process grid owners
    may run in the server's thread), "server" inside the ServerApp's `_serve`, else "harness"."""
    names = set()
    frame = sys._getframe(1)
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return "owner" if "client_fn" in names else "server" if "_serve" in names else "harness"


class OwnersRows(list):
    """The owners' partitions, counting reads by side."""

    reads: ClassVar[dict[str, int]] = {}

    def __getitem__(self, index):
        OwnersRows.reads[_side()] = OwnersRows.reads.get(_side(), 0) + 1
        return super().__getitem__(index)

    def __iter__(self):
        OwnersRows.reads[_side()] = OwnersRows.reads.get(_side(), 0) + 1
        return super().__iter__()


def test_the_server_app_never_reads_the_owners_partitions():
    """Explicit partitions reach only the owners' apps: the server never reads them, not even for the
    label set or SecAgg+'s max_weight."""
    wine = load_dataset("wine")
    parts = OwnersRows(partition(wine.X_train, wine.y_train, OWNERS, "dirichlet", 0.3, 0))
    OwnersRows.reads = {}
    result = run_simulation(FLConfig(**{**SKEW, "secagg": True}), partitions=parts, test=(wine.X_test, wine.y_test),
                            engine="inprocess")
    assert "server" not in OwnersRows.reads, OwnersRows.reads
    assert OwnersRows.reads["owner"] > 0  # the owners did train on them
    assert result.classes == np.unique(wine.y_train).tolist() and result.accuracy()[-1] >= 0.8


def test_the_deployment_server_app_never_builds_or_loads_the_owners_rows(monkeypatch):
    """The deployment apps (`veil.fl.app`, configuration from the run config): owners cut the named
    dataset's training split; the server side never calls the loader that returns that split, nor the
    partitioner (it reads its held-out split and the task description through `data.held_out`)."""
    from veil.fl.app import client_app, server_app

    calls = {"server": 0, "owner": 0, "harness": 0}

    def watched(function):
        def wrapper(*args, **kwargs):
            calls[_side()] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(clientapp, "_partitions", watched(clientapp._partitions))
    monkeypatch.setattr(clientapp, "_dataset", watched(clientapp._dataset))
    cfg = FLConfig(**{**SKEW, "secagg": True, "rounds": 1})
    run_server_app(server_app, client_app, cfg.clients, cfg.to_run_config())
    assert calls["server"] == 0 and calls["owner"] > 0


def test_server_side_dp_under_secagg_is_refused():
    """Server-side clipping needs each owner's update, which under SecAgg+ the server never sees: it would
    clip the aggregate and report an epsilon that does not hold."""
    with pytest.raises(FederatedConfigError, match="dp='client'"):
        FLConfig(secagg=True, dp="server")


def test_under_secagg_a_non_finite_update_is_a_visible_dropout(monkeypatch):
    """The server cannot validate one owner's update under SecAgg+ (it sees the sum), and SecAgg+ turns
    NaN into garbage integers inside it: the owner refuses to send it, is listed as dropped, and leaves
    the run (its refusal depends on its rows, so it is its last answer)."""
    fit = SklearnLearner.fit

    def diverging(self, X, y, config=None):
        n = fit(self, X, y, config)
        if len(y) == 70 and "veil-scaler" in (config or {}):
            self.coef = np.full_like(self.coef, np.nan)
        return n

    monkeypatch.setattr(SklearnLearner, "fit", diverging)
    result = run_simulation(FLConfig(**{**SKEW, "secagg": True}), engine="inprocess")
    dropped = [row["round"] for row in result.rejected if "non-finite update" in row["reason"]]
    assert dropped == [1]
    assert [row["round"] for row in result.rejected if terms.LEFT in row["reason"]] == [2]
    assert len(result.rejected) == 2
    assert all(np.isfinite(w).all() and np.abs(w).max() < 8 for w in result.weights)
    assert result.accuracy()[-1] >= 0.8


def test_a_training_round_secagg_cannot_finish_stops_the_run(monkeypatch):
    """When fewer owners answer than SecAgg+'s reconstruction threshold, Flower's workflow skips the
    strategy: the run stops with an error instead of reporting an untrained round as done."""
    fit = SklearnLearner.fit

    def failing(self, X, y, config=None):
        if len(y) in (17, 36) and "veil-scaler" in (config or {}):
            raise RuntimeError("owner offline")
        return fit(self, X, y, config)

    monkeypatch.setattr(SklearnLearner, "fit", failing)
    with pytest.raises(FederationError, match="round 1: no aggregate"):
        run_simulation(FLConfig(**{**SKEW, "secagg": True}), engine="inprocess")


def test_the_documented_limit_sampled_rounds_reveal_counts_through_their_totals(monkeypatch):
    """docs/fl.md, "Limits": SecAgg+ hands the server each round's total weight (the rows of the owners that
    answered). With 3 of 5 owners sampled per round, 8 rounds of subset totals give every owner's count."""
    import flwr.server.workflow.secure_aggregation.secaggplus_workflow as workflow

    totals, answered = [], {}
    unmask_stage, factor_extract = workflow.SecAggPlusWorkflow.unmask_stage, workflow.factor_extract

    def unmask(self, grid, context, state):
        answered["nodes"], answered["max_weight"] = sorted(state.active_node_ids), state.max_weight
        return unmask_stage(self, grid, context, state)

    def extract(parameters):
        factor, rest = factor_extract(parameters)
        totals.append((answered["nodes"], factor / SECAGG_LEVELS * answered["max_weight"]))
        return factor, rest

    monkeypatch.setattr(workflow.SecAggPlusWorkflow, "unmask_stage", unmask)
    monkeypatch.setattr(workflow, "factor_extract", extract)
    state = random.getstate()
    random.seed(0)  # Flower samples owners with the `random` module: a fixed draw of subsets
    try:
        run_simulation(FLConfig(**{**SKEW, "secagg": True, "rounds": 8, "fraction_fit": 0.6}), engine="inprocess")
    finally:
        random.setstate(state)
    nodes = sorted({n for subset, _ in totals for n in subset})
    sampled = [(subset, total) for subset, total in totals if len(subset) == 3]
    everyone = max(total for subset, total in totals if len(subset) == OWNERS)  # N, from a statistics round
    A = np.array([[float(n in subset) for n in nodes] for subset, _ in sampled] + [[1.0] * OWNERS])
    counts = np.linalg.lstsq(A, np.array([t for _, t in sampled] + [everyone]), rcond=None)[0]
    assert len(sampled) == 8 and np.linalg.matrix_rank(A) == OWNERS
    assert sorted(np.round(counts).astype(int).tolist()) == SIZES
