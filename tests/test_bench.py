"""`veil bench --quick` end to end on a small .npz (iris written by the test), and its errors on bad input.

The values checked are the modes' own guarantees: CKKS predictions equal the plaintext model's (the
HE modes, and the federated model on ciphertexts against itself in plaintext), MPC training follows
the same training in plaintext, the TEE row carries no number here (no attestation device) and says
why, and every networked mode moved bytes; the TEE row is measured, with the test-only attester of
`tests.tee.fakeplatform` standing in for a device, when a device and a policy trusting it exist.
"""

import json

import numpy as np
import pytest
from sklearn.datasets import load_iris

from veil import cli
from veil.bench import BenchConfig, BenchError, load

pytestmark = pytest.mark.timeout(300)

MODES = ["plaintext", "HE batch", "HE row", "HE serve", "MPC", "FL", "FL + SecAgg+", "TEE"]
NUMBERS = ("accuracy", "agreement", "inference_s_per_sample", "inference_slowdown", "training_s_per_unit",
           "training_slowdown", "bytes_on_wire", "key_bytes")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One quick run of the MLP (the leveled CKKS path, MPC with a square activation, Flower torch-mlp)."""
    tmp = tmp_path_factory.mktemp("bench")
    X, y = load_iris(return_X_y=True)
    np.savez(tmp / "iris.npz", X=X, y=y)
    out = tmp / "out"
    code = cli.main(["bench", "--quick", "--quiet", "--dataset", str(tmp / "iris.npz"), "--model", "mlp",
                     "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    return out, report, {r["mode"]: r for r in report["rows"]}


def test_every_mode_and_the_files(bench):
    out, report, _ = bench
    assert [r["mode"] for r in report["rows"]] == MODES
    assert report["models"] == ["mlp"] and {r["model"] for r in report["rows"]} == {"mlp"}
    assert (report["n_train"], report["n_test"], report["n_features"]) == (120, 30, 4)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert all(f"| {mode} |" in md for mode in MODES)
    assert "not measured" in md and "~10000x slower" in md and "10~100x slower" in md
    for r in report["rows"]:
        assert r["threat_model"] and r["measures"]


def test_tee_row_has_no_numbers_and_says_why(bench):
    tee = bench[2]["TEE"]
    assert all(tee[k] is None for k in NUMBERS)
    assert tee["details"]["measured"] is False
    assert tee["measures"].startswith("not measured: no TEE device: /dev/attestation")
    for device in ("/dev/sev-guest", "/dev/nsm", "/dev/tdx_guest", "/sys/kernel/config/tsm/report"):
        assert device in tee["measures"]


def test_tee_row_is_measured_on_an_attesting_platform(tmp_path, monkeypatch):
    """With a device (the fake attester in its place) and a policy trusting it, the row carries numbers."""
    from tests.tee.fakeplatform import PLATFORM, FakePlatform, FakeVerifier
    from tests.tee.vectors import write_policy
    from veil.bench import modes

    machine = FakePlatform()
    trusted = {"roots": [machine.root_pem], "measurements": [machine.measurement.hex()]}
    policy = write_policy(tmp_path, {PLATFORM: trusted}, plugins={PLATFORM: FakeVerifier})
    monkeypatch.setattr("veil.tee.providers.detect", lambda: (PLATFORM, "/dev/veil-test"))
    monkeypatch.setattr("veil.serve.tee_setup.provider_for", lambda platform: machine)
    ctx = load(BenchConfig(dataset="iris", models=("logreg",), quick=True, attest_policy=policy))[0]
    modes.plaintext(ctx)
    tee = modes.tee(ctx)
    assert tee["mode"] == f"TEE ({PLATFORM})" and tee["details"]["measured"] is True
    assert tee["agreement"] == 1.0
    assert tee["accuracy"] == pytest.approx(float(np.mean(ctx.plain_pred == ctx.data.y_test)))
    assert tee["inference_s_per_sample"] > 0 and tee["inference_slowdown"] > 0 and tee["details"]["attestation_s"] > 0
    assert tee["details"]["measurement"] == machine.measurement.hex()
    no_policy = load(BenchConfig(dataset="iris", models=("logreg",), quick=True))[0]
    assert modes.tee(no_policy)["measures"] == (f"not measured: {PLATFORM} device /dev/veil-test found, but no "
                                                "--attest-policy trusting it was given")


def test_he_modes_equal_plaintext(bench):
    rows = bench[2]
    plain = rows["plaintext"]
    assert plain["accuracy"] >= 0.9 and plain["bytes_on_wire"] == 0
    for mode in ("HE batch", "HE row", "HE serve"):
        r = rows[mode]
        assert r["agreement"] >= 0.995, mode
        assert r["accuracy"] == pytest.approx(plain["accuracy"], abs=0.02), mode
        assert r["bytes_on_wire"] > 0 and r["key_bytes"] > 0, mode
        assert r["inference_slowdown"] > 0
    # the row layout needs Galois keys for its rotations; the batch layout of one hidden layer none
    assert rows["HE row"]["key_bytes"] > 100 * rows["HE batch"]["key_bytes"]
    assert rows["HE serve"]["details"]["request_bytes"] == rows["HE batch"]["details"]["request_bytes"]


def test_mpc_follows_plaintext_training(bench):
    r = bench[2]["MPC"]
    d = r["details"]
    assert r["agreement"] >= 0.9
    assert r["accuracy"] == pytest.approx(d["plaintext_twin_accuracy"], abs=0.07)
    assert d["agreement_with_revealed_weights_in_plaintext"] >= 0.95
    assert r["accuracy"] >= bench[2]["plaintext"]["accuracy"] - 0.1
    assert r["bytes_on_wire"] > d["dealer_wire_bytes"] > 0
    assert r["training_unit"] == "epoch" and r["training_slowdown"] > 0


def test_federated_model_on_ciphertexts(bench):
    rows = bench[2]
    for mode in ("FL", "FL + SecAgg+"):
        r = rows[mode]
        assert r["agreement"] >= 0.995, mode
        assert r["accuracy"] == pytest.approx(r["details"]["plaintext_federated_accuracy"], abs=0.02)
        assert r["accuracy"] >= 0.8
        assert r["details"]["training_bytes"] > 0 and r["training_unit"] == "round"
    # SecAgg+ adds key agreement, secret shares and masked vectors to every round
    assert rows["FL + SecAgg+"]["details"]["training_bytes"] > rows["FL"]["details"]["training_bytes"]


@pytest.mark.parametrize("content, message", [
    (None, "unknown dataset"),
    (b"not a zip file at all", "cannot read"),
    ({"X": np.zeros((10, 3)), "y": np.zeros(9, dtype=int)}, "X must be 2-D"),
    ({"X": np.zeros((10, 3))}, "no array y"),
    ({"X": np.zeros((10, 3)), "y": np.linspace(0, 1, 10)}, "regression"),
    ({"X": np.full((10, 3), np.nan), "y": np.arange(10) % 2}, "NaN"),
])
def test_bad_input_is_a_clean_error(tmp_path, capsys, content, message):
    path = tmp_path / "data.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)
    name = str(path) if content is not None else "no_such_dataset"
    assert cli.main(["bench", "--quick", "--quiet", "--dataset", name, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("veil: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(BenchError, match=message):
        load(BenchConfig(dataset=name))


def test_unwritable_output_directory_fails_before_measuring(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    assert cli.main(["bench", "--quick", "--quiet", "--dataset", "iris", "--out", str(blocker / "out")]) == 2
    assert "cannot write results" in capsys.readouterr().err


def test_both_models_by_default():
    contexts = load(BenchConfig(dataset="iris"))
    assert [c.model_kind for c in contexts] == ["logreg", "mlp"]
    assert contexts[0].data is contexts[1].data


def test_unknown_model_is_refused():
    with pytest.raises(BenchError, match="unknown model"):
        load(BenchConfig(dataset="iris", models=("forest",)))
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--model", "forest"])
    assert exc.value.code == 2
