"""Update validation in the strategy subclasses, without the Flower runtime."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from tests.fl.faults import faulty_owners
from veil.errors import FederationError
from veil.fl.config import FLConfig
from veil.fl.strategies import build_strategy, check_update

SHAPES = [(3, 4), (3,)]


class Proxy(ClientProxy):
    node_id = 0

    def __init__(self, node_id):
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, *a, **k):
        raise NotImplementedError

    def get_parameters(self, *a, **k):
        raise NotImplementedError

    def fit(self, *a, **k):
        raise NotImplementedError

    def evaluate(self, *a, **k):
        raise NotImplementedError

    def reconnect(self, *a, **k):
        raise NotImplementedError


def _res(node_id, arrays, n=10):
    params = arrays if isinstance(arrays, Parameters) else ndarrays_to_parameters(arrays)
    return Proxy(node_id), FitRes(Status(Code.OK, ""), params, n, {})


def test_check_update_reasons():
    good = [np.zeros(s) for s in SHAPES]
    assert check_update(good, SHAPES) is None
    assert "2 arrays" in check_update(good[:1], SHAPES)
    assert "shape" in check_update([np.zeros((4, 3)), np.zeros(3)], SHAPES)
    assert "dtype" in check_update([np.zeros(SHAPES[0], dtype=np.int64), np.zeros(3)], SHAPES)
    assert "NaN" in check_update([np.full(SHAPES[0], np.inf), np.zeros(3)], SHAPES)


@pytest.mark.parametrize(("strategy", "dp"), [("fedavg", "off"), ("fedtrimmedavg", "off"), ("fedmedian", "off"),
                                              ("fedavg", "server")])
def test_bad_updates_are_dropped_and_good_ones_aggregated(strategy, dp):
    cfg = FLConfig(clients=6, strategy=strategy, dp=dp, noise_multiplier=0.0, clipping_norm=100.0)
    initial = [np.zeros(s) for s in SHAPES]
    s = build_strategy(cfg, initial, lambda *a: None)
    assert type(s).__name__.startswith("Validating")
    if dp == "server":
        s.current_round_params = initial  # what configure_fit records in a real round
    good = [_res(i, [np.full(SHAPES[0], float(i)), np.full(3, float(i))]) for i in (1, 2, 3)]
    bad = [_res(10, [np.zeros((3, 5)), np.zeros(3)]),
           _res(11, [np.full(SHAPES[0], np.nan), np.zeros(3)]),
           _res(12, Parameters(tensors=[b"not numpy"], tensor_type="numpy.ndarray")),
           _res(13, [np.zeros(s) for s in SHAPES], n=0)]
    params, _ = s.aggregate_fit(1, good + bad, [])
    out = parameters_to_ndarrays(params)
    np.testing.assert_allclose(out[0], np.full(SHAPES[0], 2.0))  # mean (and median) of 1, 2, 3
    assert sorted(r["node_id"] for r in s.rejected) == [10, 11, 12, 13]
    assert s.aggregated == [3]
    with pytest.raises(FederationError, match="fewer than the minimum of 2"):
        s.aggregate_fit(2, bad, [])  # no valid update at all: the run stops with the reason


def test_adaptive_fedadam_steps_towards_the_mean_update():
    initial = [np.zeros(s) for s in SHAPES]
    s = build_strategy(FLConfig(clients=3, strategy="fedadam", server_lr=0.1), initial, lambda *a: None)
    assert type(s).__name__ == "ValidatingFedAdam"
    results = [_res(i, [np.full(SHAPES[0], 1.0), np.full(3, 1.0)]) for i in (1, 2)]
    results.append(_res(3, [np.zeros((2, 2))]))
    out = parameters_to_ndarrays(s.aggregate_fit(1, results, [])[0])
    assert [a.shape for a in out] == SHAPES
    assert np.all(out[0] > 0) and np.all(out[0] <= 1.0)  # an Adam step of size ~eta towards the mean (1.0)
    assert [r["node_id"] for r in s.rejected] == [3]


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="FedProx"):
        build_strategy(FLConfig(strategy="fedprox", model="logreg"), [np.zeros(2)], lambda *a: None)
    assert build_strategy(FLConfig(strategy="fedprox", model="torch-linear"), [np.zeros(2)], lambda *a: None)
    with pytest.raises(ValueError, match="strategy"):
        build_strategy(FLConfig(strategy="fedbest"), [np.zeros(2)], lambda *a: None)
    with pytest.raises(ValueError, match="dp"):
        FLConfig(dp="local")
    with pytest.raises(ValueError, match="fault"):
        faulty_owners({0: "evil"})
    cfg = FLConfig(clients=4, secagg=True, strategy="fedmedian", round_timeout=2.5, scaling="minmax")
    assert FLConfig.from_run_config(cfg.to_run_config()) == cfg
