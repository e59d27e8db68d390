"""Attack review of issue 19's federated privacy (second round): a curious federated server under
SecAgg+ that writes its own ServerApp (its own strategy, fit configs and SecAgg+ messages) against
honest owners.

Each test either passes (the defence holds: kept as a regression test) or is a strict xfail (a
finding, reproduced). In-process grid (`veil.fl.inprocess`), the wine owners of test_server_view. The
server watches what it always sees: which owners answered each SecAgg+ stage, and its own messages."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from veil.errors import FederatedConfigError
from veil.fl import terms
from veil.fl.clientapp import make_client_app
from veil.fl.config import FLConfig, held_out_view, resolve_task
from veil.fl.data import load_dataset
from veil.fl.inprocess import FIRST_NODE_ID, InProcessGrid
from veil.fl.partition import partition
from veil.fl.preprocessing import SECAGG_LEVELS, SECAGG_MODULUS, FederatedScaler, stats_size
from veil.fl.rounds import secagg_terms

from .test_server_view import OWNERS, SIZES, SKEW, _sizes

pytestmark = pytest.mark.timeout(300)
PLAIN = {"veil-max-weight": 1000.0}  # a training round's fit config as earlier versions expected it (ignored now)


def _rows() -> dict[int, int]:
    """Each owner's row count by node id (what the server must not learn)."""
    wine = load_dataset("wine")
    parts = partition(wine.X_train, wine.y_train, OWNERS, "dirichlet", 0.3, 0)
    return {FIRST_NODE_ID + i: len(y) for i, (_, y) in enumerate(parts)}


class PerOwnerConfig(FedAvg):
    """The curious server's strategy: every owner in every round, each with a fit config (and, when
    given, parameters) of its own."""

    def __init__(self, configs: dict[int, dict], weights, parameters: dict[int, list] | None = None) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=OWNERS, min_available_clients=OWNERS,
                         initial_parameters=ndarrays_to_parameters(weights))
        self.configs, self.parameters = configs, parameters or {}

    def configure_fit(self, server_round, parameters, client_manager):
        clients = client_manager.sample(num_clients=OWNERS, min_num_clients=OWNERS)
        out = []
        for c in clients:
            own = self.parameters.get(int(c.node_id))
            out.append((c, FitIns(parameters if own is None else ndarrays_to_parameters(own),
                                  dict(self.configs[int(c.node_id)]))))
        return out


Send = Callable[[list], list]


@dataclass
class Round:
    """What the server saw of one SecAgg+ round: per stage, the messages it sent and the replies."""

    sent: dict[str, list] = field(default_factory=dict)
    replies: dict[str, list] = field(default_factory=dict)

    def answered(self, stage: str = Stage.COLLECT_MASKED_VECTORS) -> dict[int, bool]:
        """Which owners answered `stage` without an error (False for those never asked)."""
        ok = {int(r.metadata.src_node_id): not r.has_error() for r in self.replies.get(stage, [])}
        return {n: ok.get(n, False) for n in range(FIRST_NODE_ID, FIRST_NODE_ID + OWNERS)}

    def reasons(self, stage: str = Stage.COLLECT_MASKED_VECTORS) -> dict[int, str]:
        return {int(r.metadata.src_node_id): r.error.reason for r in self.replies.get(stage, []) if r.has_error()}


def _stage(msg) -> str:
    return msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]


def _secagg_round(grid: InProcessGrid, cfg: FLConfig, configs: dict[int, dict], *, stage: int | None = None,
                  max_weight: float = 1000.0, parameters: dict[int, list] | None = None,
                  intercept: Callable[[list, Send], list] | None = None) -> Round:
    """One SecAgg+ round with per-owner fit configs through Flower's own workflow: training (`stage`
    None, the learner's initial weights) or statistics stage `stage` (zeros); SecAgg+ with the run's
    public parameters but `max_weight` (1000 rows by default) where the round weighs by rows.
    `intercept(messages, send)` may rewrite the messages of any stage and the replies."""
    seen = Round()
    send_and_receive = grid.send_and_receive

    def record(messages, *, timeout=None):
        messages = list(messages)
        name = _stage(messages[0])

        def send(batch):
            return list(send_and_receive(batch, timeout=timeout))

        replies = intercept(messages, send) if intercept else send(messages)
        seen.sent[name], seen.replies[name] = messages, replies
        return replies

    grid.send_and_receive = record
    try:
        task = resolve_task(cfg, None)
        weights = (cfg.learner(task).get_weights() if stage is None
                   else [np.zeros(stats_size(stage, task.n_features, cfg.scaling == "minmax"))])
        context = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                          run_config=cfg.to_run_config())
        strategy = PerOwnerConfig(configs, weights, parameters)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        public = secagg_terms(cfg, stage, max_weight)
        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(**public))(grid, legacy)
    finally:
        grid.send_and_receive = send_and_receive
    return seen


def _grid(cfg: FLConfig) -> InProcessGrid:
    return InProcessGrid(make_client_app(cfg), OWNERS, cfg.to_run_config())


def _setup_per_owner(key: str, values: dict[int, object]) -> Callable[[list, Send], list]:
    """An interceptor that gives each owner named in `values` its own SecAgg+ setup parameter `key`."""

    def intercept(messages, send):
        if _stage(messages[0]) == Stage.SETUP:
            for msg in messages:
                if msg.metadata.dst_node_id in values:
                    msg.content = copy.deepcopy(msg.content)  # the workflow shares one content between owners
                    msg.content.config_records[RECORD_KEY_CONFIGS][key] = values[msg.metadata.dst_node_id]
        return send(messages)

    return intercept


def _binary_search(rounds: int, probe: Callable[[dict[int, int]], dict[int, bool]], low: int,
                   high: int) -> dict[int, tuple[int, int]]:
    """Each owner's interval (lo, hi] after `rounds` probes, `probe(mid)` answering, per owner, whether
    its secret is <= mid."""
    lo = dict.fromkeys(range(FIRST_NODE_ID, FIRST_NODE_ID + OWNERS), low)
    hi = dict.fromkeys(lo, high)
    for _ in range(rounds):
        mid = {n: (lo[n] + hi[n]) // 2 for n in lo}
        below = probe(mid)
        for n in lo:
            if below[n]:
                hi[n] = mid[n]
            else:
                lo[n] = mid[n]
    return {n: (lo[n], hi[n]) for n in lo}


def test_a_server_choosing_max_weight_per_owner_cannot_learn_the_counts():
    """The attack of the review: a fit config `veil-max-weight` chosen per owner and round, binary search
    over 7 SecAgg+ rounds (of a run that has 7). Owners no longer read that value (their bound is
    SecAgg+'s own max_weight, fixed for the run): every owner answers every round, whatever its count."""
    assert _sizes() == SIZES
    cfg = FLConfig(**{**SKEW, "secagg": True, "rounds": 7})
    grid = _grid(cfg)
    patterns = []

    def probe(mid):
        answered = _secagg_round(grid, cfg, {n: {"veil-max-weight": float(mid[n])} for n in mid}).answered()
        patterns.append(answered)
        return answered

    try:
        found = _binary_search(7, probe, 0, 128)
    finally:
        grid.close()
    learned = sorted(hi for lo, hi in found.values() if hi - lo == 1)
    assert learned != SIZES, f"the server learned every owner's row count: {learned}"
    assert all(all(answered.values()) for answered in patterns)


def test_a_server_varying_secaggs_max_weight_per_owner_learns_nothing_from_refusals():
    """The same search through SecAgg+'s own max_weight (and the fit config's): the first row-weighted
    round fixes each owner's bound for the run and a count above it is clipped, not refused, so every
    owner answers it; every later round carries a different bound and is refused, by every owner."""
    cfg = FLConfig(**{**SKEW, "secagg": True, "rounds": 7})
    grid = _grid(cfg)
    patterns, reasons = [], []

    def probe(mid):
        bounds = {n: float(mid[n]) for n in mid}
        seen = _secagg_round(grid, cfg, {n: {"veil-max-weight": bounds[n]} for n in mid},
                             intercept=_setup_per_owner(Key.MAX_WEIGHT, bounds))
        patterns.append(seen.answered())
        reasons.append(seen.reasons())
        return patterns[-1]

    try:
        found = _binary_search(7, probe, 0, 128)
    finally:
        grid.close()
    assert sorted(hi for lo, hi in found.values() if hi - lo == 1) != SIZES
    assert all(patterns[0].values())  # 64 rows each: the 70-row owner is weighed at 64, not refused
    assert not any(any(answered.values()) for answered in patterns[1:])
    assert all(len(set(later.values())) == 1 for later in reasons[1:])  # each round, one reason for all owners


def test_a_server_choosing_the_row_bound_per_owner_learns_nothing():
    """A count stage whose fit config sets `veil-row-bound` below two owners' counts: owners take the
    bound from the run config (`secagg_max_rows`), so all of them answer."""
    cfg = FLConfig(**{**SKEW, "secagg": True})
    grid = _grid(cfg)
    try:
        configs = {n: {"veil-task": "stats", "veil-stage": 1, "veil-row-bound": 20.0} for n in grid.node_ids}
        answered = _secagg_round(grid, cfg, configs, stage=1).answered()
    finally:
        grid.close()
    assert all(answered.values()), answered


def _reference(cfg: FLConfig) -> np.ndarray:
    """A stage-2 reference unit per feature from the server's own held-out rows: powers of two."""
    return np.exp2(np.ceil(np.log2(np.abs(held_out_view(cfg).X).max(0))) + 2)


def test_a_server_choosing_the_count_unit_per_owner_learns_nothing():
    """Stage 2 sends c / n_i, and earlier versions refused when it left SecAgg+'s range (n_i < c / 64),
    so a count unit c chosen per owner was a count oracle: binary search over 7 stage-2 rounds. Weighed
    by rows the entry travels as c / max_weight, which owners hold to the range whatever their rows, and
    they answer stage 2 once per run: the first round is answered by all, the later ones by none."""
    cfg = FLConfig(**{**SKEW, "secagg": True})
    blob = _reference(cfg).astype("<f8").tobytes()
    grid = _grid(cfg)
    patterns = []

    def probe(mid):
        configs = {n: {"veil-task": "stats", "veil-stage": 2, "veil-reference": blob, "veil-max-weight": 1000.0,
                       "veil-count-unit": 64.0 * (mid[n] + 1)} for n in mid}
        patterns.append(_secagg_round(grid, cfg, configs, stage=2).answered())
        return {n: not ok for n, ok in patterns[-1].items()}  # refused meant n_i < mid + 1, i.e. n_i <= mid

    try:
        found = _binary_search(7, probe, -1, 127)  # the first c is 4096, a power of two like the server's
    finally:
        grid.close()
    assert sorted(hi for lo, hi in found.values() if hi - lo == 1) != SIZES
    assert all(patterns[0].values())  # c = 4096: 2048 / n_i > 64 for the owners of 2 and 17 rows
    assert not any(any(answered.values()) for answered in patterns[1:])


def test_a_count_unit_beyond_the_runs_max_weight_is_refused_by_every_owner():
    """The count unit's bound is c <= 32 max_weight, the same for every owner: a larger c is refused by
    all, whatever their rows."""
    cfg = FLConfig(**{**SKEW, "secagg": True})
    blob = _reference(cfg).astype("<f8").tobytes()
    grid = _grid(cfg)
    try:
        configs = {n: {"veil-task": "stats", "veil-stage": 2, "veil-reference": blob,
                       "veil-count-unit": 64.0 * 1024} for n in grid.node_ids}
        seen = _secagg_round(grid, cfg, configs, stage=2)
    finally:
        grid.close()
    assert not any(seen.answered().values())
    assert all("count unit is too large" in reason for reason in seen.reasons().values())


def test_a_server_probing_refinement_references_gets_at_most_one_refusal_per_owner():
    """Stage 3 refuses a statistic beyond SecAgg+'s range, so references [m, s] chosen per owner probe
    its feature means (here feature 0: refused about when its mean exceeds m + 8 s). References change
    legitimately between refinement rounds, so they cannot be fixed; instead an owner's first refusal
    is its last answer, and it answers at most MAX_PASSES - 2 refinement rounds: each owner's answers
    are a run of successes then refusals only, which tells the server at most where it left."""
    cfg = FLConfig(**{**SKEW, "secagg": True})
    scale = _reference(cfg)
    grid = _grid(cfg)
    patterns = []

    def probe(mid):
        configs = {}
        for n in mid:
            m, s = np.zeros_like(scale), scale.copy()
            s[0], m[0] = 1.0, mid[n] / 100 - 8.0  # feature 0 in hundredths
            configs[n] = {"veil-task": "stats", "veil-stage": 3, "veil-reference": np.concatenate([m, s]).tobytes(),
                          "veil-max-weight": 1000.0}
        patterns.append(_secagg_round(grid, cfg, configs, stage=3).answered())
        return patterns[-1]

    try:
        _binary_search(8, probe, 1000, 1600)
    finally:
        grid.close()
    for n in grid.node_ids:
        answers = [answered[n] for answered in patterns]
        k = answers.index(False) if False in answers else len(answers)
        assert answers == [True] * k + [False] * (len(answers) - k), (n, answers)
        assert k <= terms.STAGE_BUDGET[3]


def test_an_owner_that_refuses_a_training_update_answers_no_later_round():
    """The update's range check depends on the owner's rows and on parameters the server chooses per
    owner: after one owner's update leaves `secagg_clip` from the parameters it was sent, it refuses
    every later round (with a fixed reason), while the others go on."""
    cfg = FLConfig(**{**SKEW, "secagg": True, "rounds": 3})
    grid = _grid(cfg)
    target = grid.node_ids[0]
    weights = cfg.learner(resolve_task(cfg, None)).get_weights()
    far = [np.full_like(w, 50.0) for w in weights]
    try:
        first = _secagg_round(grid, cfg, {n: dict(PLAIN) for n in grid.node_ids}, parameters={target: far})
        later = [_secagg_round(grid, cfg, {n: dict(PLAIN) for n in grid.node_ids}) for _ in range(2)]
    finally:
        grid.close()
    assert first.answered()[target] is False and "clipping range" in first.reasons()[target]
    for seen in later:
        assert seen.answered() == {n: n != target for n in grid.node_ids}
        assert terms.LEFT in seen.reasons()[target]


def test_changing_the_scaler_or_row_total_between_training_rounds_is_refused():
    """The federated scaler and the row total shape every update (hence its range check): the first
    training round fixes them, and an owner sent other ones later refuses, then answers nothing more."""
    cfg = FLConfig(**{**SKEW, "secagg": True, "rounds": 3})
    grid = _grid(cfg)
    d = resolve_task(cfg, None).n_features
    scaler = FederatedScaler("standard", np.zeros(d), np.ones(d), 142, np.zeros(d), np.ones(d))
    other = FederatedScaler("standard", np.zeros(d), np.full(d, 2.0), 142, np.zeros(d), np.ones(d))
    a, b = grid.node_ids[:2]
    same = {n: {**PLAIN, "veil-scaler": scaler.pack(), "veil-total": 142} for n in grid.node_ids}
    changed = {**same, a: {**PLAIN, "veil-scaler": other.pack(), "veil-total": 142},
               b: {**PLAIN, "veil-scaler": scaler.pack(), "veil-total": 10}}
    try:
        rounds = [_secagg_round(grid, cfg, configs) for configs in (same, changed, same)]
    finally:
        grid.close()
    assert all(rounds[0].answered().values())
    for seen in rounds[1:]:
        assert seen.answered() == {n: n not in (a, b) for n in grid.node_ids}
    assert all("scaler or row total" in rounds[1].reasons()[n] for n in (a, b))


def test_secagg_parameters_other_than_the_runs_are_refused():
    """SecAgg+'s setup parameters come from the server per owner: a reconstruction threshold of 1 (one
    share reveals a secret), another clipping or quantization range. Each owner holds them to the run's
    (`rounds.secagg_terms`) before its rows are touched."""
    cfg = FLConfig(**{**SKEW, "secagg": True})
    grid = _grid(cfg)
    a, b, c = grid.node_ids[:3]
    tampered = {a: (Key.THRESHOLD, 1), b: (Key.CLIPPING_RANGE, 1e6), c: (Key.TARGET_RANGE, 2 ** 10)}

    def intercept(messages, send):
        for node, (key, value) in tampered.items():
            _setup_per_owner(key, {node: value})(messages, lambda batch: batch)
        return send(messages)

    try:
        seen = _secagg_round(grid, cfg, {n: dict(PLAIN) for n in grid.node_ids}, intercept=intercept)
    finally:
        grid.close()
    assert seen.answered(Stage.SETUP) == dict.fromkeys(grid.node_ids, True)  # key exchange carries no data
    assert seen.answered() == {n: n not in tampered for n in grid.node_ids}
    assert all("is not the run's" in seen.reasons()[n] for n in tampered)


def _unmask_one(target: int, seen_setup: list, seen_collect: tuple[list, list], replies: list,
                max_weight: float) -> float | None:
    """What a server holding both secrets of `target` gets: its mask seed from the shares listed for it
    as answered, its first key from those listed for it as dropped, hence its own masked vector unmasked;
    returns its weight (its row count in a row-weighted round), or None without enough shares."""
    threshold = secagg_terms(FLConfig(**SKEW), None, 1.0)["reconstruction_threshold"]
    seeds, keys = [], []
    for reply in replies:
        if reply.has_error():
            continue
        record = reply.content.config_records[RECORD_KEY_CONFIGS]
        mine = [share for nid, share in zip(record[Key.NODE_ID_LIST], record[Key.SHARE_LIST], strict=True)
                if nid == target]
        if len(mine) == 2:
            seeds.append(mine[0])
            keys.append(mine[1])
    if len(seeds) < threshold:
        return None
    pk1 = {int(r.metadata.src_node_id): r.content.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_1]
           for r in seen_setup if not r.has_error()}
    sent, answers = seen_collect
    sources = next(m for m in sent if m.metadata.dst_node_id == target).content.config_records[
        RECORD_KEY_CONFIGS][Key.SOURCE_LIST]
    masked = [bytes_to_ndarray(b) for b in next(r for r in answers if r.metadata.src_node_id == target)
              .content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
    dims = [a.shape for a in masked]
    vector = parameters_subtraction(masked, pseudo_rand_gen(combine_shares(seeds), SECAGG_MODULUS, dims))
    sk1 = bytes_to_private_key(combine_shares(keys))
    for other in sources:
        pair = pseudo_rand_gen(generate_shared_key(sk1, bytes_to_public_key(pk1[other])), SECAGG_MODULUS, dims)
        vector = parameters_subtraction(vector, pair) if target > other else parameters_addition(vector, pair)
    factor, _ = factor_extract(parameters_mod(vector, SECAGG_MODULUS))
    return factor / SECAGG_LEVELS * max_weight


def test_a_server_listing_an_owner_as_answered_and_dropped_cannot_unmask_it():
    """In SecAgg+'s unmask stage the server names the owners that answered (it gets their mask seeds'
    shares) and those that dropped (their keys' shares). Naming one owner in both lists would give it
    both secrets of that owner, i.e. its own masked vector unmasked, weight (row count) included.
    Owners refuse such lists (and leave the run), so no share comes back."""
    rows = _rows()
    cfg = FLConfig(**{**SKEW, "secagg": True})
    grid = _grid(cfg)
    target = max(rows, key=rows.get)  # the 70-row owner
    stolen = {}

    def intercept(messages, send):
        if _stage(messages[0]) != Stage.UNMASK:
            return send(messages)
        for msg in messages:
            msg.content = copy.deepcopy(msg.content)
            record = msg.content.config_records[RECORD_KEY_CONFIGS]
            record[Key.DEAD_NODE_ID_LIST] = [*record[Key.DEAD_NODE_ID_LIST], target]
        replies = send(messages)
        stolen["replies"] = replies
        return [r for r in replies if r.has_error()]  # the workflow gets nothing to combine

    try:
        seen = _secagg_round(grid, cfg, {n: dict(PLAIN) for n in grid.node_ids}, intercept=intercept)
    finally:
        grid.close()
    assert all(seen.answered().values())
    recovered = _unmask_one(target, seen.replies[Stage.SETUP],
                            (seen.sent[Stage.COLLECT_MASKED_VECTORS], seen.replies[Stage.COLLECT_MASKED_VECTORS]),
                            stolen["replies"], 1000.0)
    assert recovered is None, f"the server unmasked one owner's vector: weight {recovered} (rows {rows[target]})"
    assert len(stolen["replies"]) == OWNERS and all(reply.has_error() for reply in stolen["replies"])


def test_more_training_rounds_than_the_run_has_are_refused():
    """Every training round is another chance to probe with new parameters: an owner answers at most the
    run's `rounds` of them."""
    cfg = FLConfig(**{**SKEW, "secagg": True, "rounds": 2})
    grid = _grid(cfg)
    try:
        rounds = [_secagg_round(grid, cfg, {n: dict(PLAIN) for n in grid.node_ids}) for _ in range(3)]
    finally:
        grid.close()
    assert [all(seen.answered().values()) for seen in rounds] == [True, True, False]
    assert not any(rounds[2].answered().values())
    assert all("more training rounds" in reason for reason in rounds[2].reasons().values())


def test_an_owner_above_the_rounds_max_weight_is_weighed_at_the_bound(monkeypatch):
    """SecAgg+ would take a weight above max_weight as a ratio above 1 (its factor can overflow the sum);
    a refusal would tell the server whether the count exceeds a bound of its choosing. The owner answers
    and is weighed at the bound: the sum of weights is that of min(n_i, 50)."""
    import flwr.server.workflow.secure_aggregation.secaggplus_workflow as workflow

    totals = []
    factor_extract = workflow.factor_extract

    def extract(parameters):
        factor, rest = factor_extract(parameters)
        totals.append(factor / SECAGG_LEVELS * 50.0)
        return factor, rest

    monkeypatch.setattr(workflow, "factor_extract", extract)
    rows = _rows()
    cfg = FLConfig(**{**SKEW, "secagg": True})
    grid = _grid(cfg)
    try:
        seen = _secagg_round(grid, cfg, {n: {"veil-max-weight": 50.0} for n in grid.node_ids}, max_weight=50.0)
    finally:
        grid.close()
    assert all(seen.answered().values())
    assert totals == [pytest.approx(sum(min(n, 50) for n in rows.values()), abs=0.01)]


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


def test_a_reconstruction_threshold_at_most_half_the_shares_is_refused():
    """Owners learn who survived a round only from the server; with a threshold at most half the shares,
    a server telling two halves of the owners different survivor lists collects both secrets of the owner
    between them. A configuration asking for it is refused; the default is a strict majority."""
    with pytest.raises(FederatedConfigError, match="must exceed half"):
        FLConfig(secagg=True, clients=10, secagg_threshold=5)
    assert FLConfig(secagg=True, clients=10, secagg_threshold=6).secagg_params() == (10, 6)
    shares, threshold = FLConfig(secagg=True, clients=10).secagg_params()
    assert 2 * threshold > shares
