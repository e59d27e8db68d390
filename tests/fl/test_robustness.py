"""Owners that crash or hang are dropped from their round; too few stops the run; checkpoints resume it;
the CLI reports the exported model's encrypted accuracy. In-process grid (same Flower apps, no Ray)."""

import json

import numpy as np
import pytest

from tests.fl.faults import faulty_owners
from veil.errors import FederatedConfigError, FederationError
from veil.fl import cli
from veil.fl.checkpoint import load_checkpoint, save_checkpoint
from veil.fl.config import FLConfig, FLResult
from veil.fl.simulation import run_simulation

pytestmark = pytest.mark.timeout(240)


def test_crashing_and_slow_owners_are_dropped_and_the_run_goes_on():
    cfg = FLConfig(clients=5, rounds=3, dataset="wine", round_timeout=0.5)
    result = run_simulation(cfg, engine="inprocess", owner_factory=faulty_owners({1: "crash", 3: "slow"}, 2.0))
    assert [h["round"] for h in result.history] == [0, 1, 2, 3]
    training = [r for r in result.rejected if isinstance(r["round"], int)]
    for rnd in (1, 2, 3):
        reasons = [r["reason"] for r in training if r["round"] == rnd]
        assert sum("injected fault" in r for r in reasons) == 1  # the crash, with its reason
        assert reasons.count("no reply within the round timeout") == 1  # the sleeper
    assert result.statistics["owners_aggregated"] == [3] * result.statistics["rounds"]
    sizes = [len(part) for part in np.array_split(np.arange(142), 5)]
    assert result.statistics["n_samples"] == sizes[0] + sizes[2] + sizes[4]  # the owners that answered
    assert result.accuracy()[-1] >= 0.9


def test_the_run_stops_when_fewer_than_the_minimum_remain():
    cfg = FLConfig(clients=3, rounds=2, dataset="wine", min_clients=3, scaling="off")
    with pytest.raises(FederationError, match="fewer than the minimum of 3"):
        run_simulation(cfg, engine="inprocess", owner_factory=faulty_owners({0: "crash"}))


def test_fraction_fit_samples_owners_each_round():
    cfg = FLConfig(clients=5, rounds=2, dataset="iris", fraction_fit=0.6)
    seen = []
    from veil.fl import strategies

    original = strategies.ValidatingMixin.aggregate_fit

    def spy(self, server_round, results, failures):
        seen.append(len(results))
        return original(self, server_round, results, failures)

    mp = pytest.MonkeyPatch()
    mp.setattr(strategies.ValidatingMixin, "aggregate_fit", spy)
    try:
        result = run_simulation(cfg, engine="inprocess")
    finally:
        mp.undo()
    rounds = result.statistics["rounds"]
    assert seen == [5] * rounds + [3, 3]  # statistics from every owner, training from 3 of 5


def test_resume_continues_from_the_last_checkpointed_round(tmp_path):
    full = run_simulation(FLConfig(clients=4, rounds=4, dataset="breast_cancer"), engine="inprocess")
    first = FLConfig(clients=4, rounds=2, dataset="breast_cancer", checkpoint_dir=str(tmp_path / "ck"))
    run_simulation(first, engine="inprocess")
    saved = load_checkpoint(tmp_path / "ck")
    assert saved.history[-1]["round"] == 2 and saved.scaler is not None
    resumed_cfg = FLConfig(**{**first.__dict__, "rounds": 4, "resume": str(tmp_path / "ck")})
    resumed = run_simulation(resumed_cfg, engine="inprocess")
    assert [h["round"] for h in resumed.history] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(resumed.scaler.center, full.scaler.center)
    for a, b in zip(resumed.weights, full.weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert resumed.history[-1]["accuracy"] == pytest.approx(full.history[-1]["accuracy"])


def test_checkpoints_with_the_retired_fault_fields_load_and_others_are_refused(tmp_path):
    """result.json files of earlier versions carry `faults` and `slow_seconds` (fault injection lived in
    FLConfig): inert ones load, a run that injected faults or an unknown field is a typed error."""
    cfg = FLConfig(clients=3, rounds=2, dataset="wine")
    save_checkpoint(FLResult(cfg, history=[{"round": 0, "loss": 1.0}], weights=[np.ones(3)], n_features=3),
                    tmp_path)
    path = tmp_path / "result.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "config": {**data["config"], "faults": "", "slow_seconds": 5.0}}))
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == cfg and loaded.history == [{"round": 0, "loss": 1.0}]
    np.testing.assert_array_equal(loaded.weights[0], np.ones(3))
    for extra, match in (({"faults": "1:nan"}, "injected faults"), ({"colour": "red"}, "colour")):
        path.write_text(json.dumps({**data, "config": {**data["config"], **extra}}))
        with pytest.raises(FederatedConfigError, match=match):
            load_checkpoint(tmp_path)


def test_cli_reports_encrypted_accuracy_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["run", "--clients", "5", "--dataset", "wine", "--simulator", "inprocess", "--out", str(out),
            "--json", "--quiet"]
    assert cli.main([*base, "--rounds", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scaling"] == "standard" and summary["statistics"]["n_samples"] == 142
    assert summary["encrypted_agreement"] == 1.0
    assert summary["encrypted_accuracy"] == summary["plaintext_accuracy"] == summary["history"][-1]["accuracy"]
    saved = json.loads((out / "result.json").read_text())
    assert saved["export"]["encrypted_agreement"] == 1.0 and saved["scaler"]["kind"] == "standard"
    assert json.loads((out / "checkpoint" / "result.json").read_text())["history"][-1]["round"] == 2
    assert cli.main([*base, "--resume", str(out), "--rounds", "4"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert [h["round"] for h in resumed["history"]] == [0, 1, 2, 3, 4]
    assert resumed["encrypted_agreement"] == 1.0 and resumed["encrypted_accuracy"] >= 0.94
    text_code = cli.main(["run", "--clients", "3", "--rounds", "1", "--dataset", "iris", "--simulator", "inprocess",
                          "--out", str(tmp_path / "raw"), "--no-standardize", "--quiet"])
    assert text_code == 0
    table = capsys.readouterr().out
    assert "encrypted agreement: 1.0000" in table and "scaling" not in table
