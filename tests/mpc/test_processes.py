"""Parties and dealer as separate processes linked by mutually authenticated TLS on 127.0.0.1."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from benchmarks.mpc_models import load_digits, make_model, plain_train

from veil.mpc import launch
from veil.mpc.certs import make_dev_pki
from veil.mpc.cli import add_parser
from veil.mpc.errors import PartyFailureError
from veil.mpc.party import peer_addresses
from veil.mpc.provider import HEADER_BYTES
from veil.net import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(120)
def test_products_over_tls_three_parties():
    res = launch("tests.mpc.programs:products", n_parties=3, args=(3,), timeout=30, wall_timeout=100)
    assert res[0] == [[0.0, 0.5, 1.0, 1.5]] * 3
    assert res[1] == [None] * 3 and res[2] == [None] * 3
    assert res[3]["requests"] == 3  # one request per product: the triple with its truncation material


@pytest.mark.timeout(180)
def test_training_over_tls_matches_plaintext():
    x, y = load_digits(28)
    torch.manual_seed(0)
    model = make_model("mlp")
    cfg = {"model": "mlp", "lr": 0.05, "epochs": 1, "batch": 32, "seed": 0, "momentum": 0.5}
    public = (cfg, [32, 32], tuple(x.shape[1:]))
    private = [((x[:32], y[:32]), model.state_dict()), ((x[32:64], y[32:64]),)]
    res = launch("benchmarks.mpc_models:party_train", 2, public, party_args=private, timeout=60,
                 wall_timeout=170)
    ref = plain_train(cfg, model.state_dict(), x[:64], y[:64])["state"]
    for k, v in ref.items():
        assert (res[0]["weights"][k] - v).abs().max() < 1e-3, k
    assert res[1]["weights"] is None
    traffic = res[0]["traffic"][0]
    assert traffic["rounds"] > 0 and traffic["bytes_sent"] > 0
    # the dealer never receives data: party 0 sends it nothing, party 1 only fixed-size request headers
    assert all(t["bytes_to_dealer"] == 0 for t in res[0]["traffic"])
    assert all(t["bytes_to_dealer"] % HEADER_BYTES == 0 for t in res[1]["traffic"])


def _start(entry: str, args_file: str, world: int, timeout: float, pki_dir):
    pki = make_dev_pki(pki_dir, world - 1)
    peers = ",".join(f"127.0.0.1:{free_port()}" for _ in range(world - 1))
    procs = []
    for r in range(world):
        cmd = [sys.executable, "-m", "veil.mpc.party", "--rank", str(r), "--world", str(world),
               "--peers", peers, "--ca", str(pki[r].ca), "--cert", str(pki[r].cert), "--key", str(pki[r].key),
               "--entry", entry, "--args", args_file, "--timeout", str(timeout)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.timeout(120)
def test_killed_party_makes_the_others_fail_cleanly(tmp_path):
    marker = str(tmp_path / "m")
    torch.save((1, marker), tmp_path / "args.pt")
    procs = _start("tests.mpc.programs:crash", str(tmp_path / "args.pt"), 3, timeout=60, pki_dir=tmp_path / "pki")
    try:
        # wait until party 0 is computing, then SIGKILL it from outside
        for _ in range(600):
            if os.path.exists(marker + "0"):
                break
            time.sleep(0.1)
        procs[0].send_signal(signal.SIGKILL)
        # party 1 exits by itself (os._exit) — both crashes must stop the dealer and each other
        codes = [p.wait(timeout=90) for p in procs]
        errs = [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes[0] == -signal.SIGKILL
    assert codes[1] in (17, 3)
    assert codes[2] == 3, errs[2]  # the dealer: clean failure, no hang
    assert "failed" in errs[2]


@pytest.mark.timeout(120)
def test_one_crash_stops_everyone_through_launch(tmp_path):
    with pytest.raises(PartyFailureError) as info:
        launch("tests.mpc.programs:crash", 2, args=(1, str(tmp_path / "m")), timeout=30, wall_timeout=100)
    assert "rank" in str(info.value)
    codes = info.value.exit_codes
    assert codes[1] == 17  # the crashed party
    assert codes[0] == 3 and codes[2] == 3  # the others ended by themselves with a clean failure


@pytest.mark.timeout(120)
def test_silent_party_leads_to_timeout_error():
    with pytest.raises(PartyFailureError) as info:
        launch("tests.mpc.programs:hang", 2, args=(1,), timeout=4, wall_timeout=100)
    codes = info.value.exit_codes
    assert codes[0] == 3  # party 0 gave up by itself after the timeout
    assert codes[1] is None  # the silent party was stopped by the launcher


def test_cli_parser():
    import argparse

    root = argparse.ArgumentParser()
    add_parser(root.add_subparsers(dest="cmd"))
    ns = root.parse_args(["mpc", "party", "--rank", "2", "--world", "3", "--addr", "127.0.0.1:5000",
                          "--certs", "pki"])
    assert (ns.rank, ns.world, ns.addr) == (2, 3, "127.0.0.1:5000") and callable(ns.func)
    assert peer_addresses(ns) == ["127.0.0.1:5000", "127.0.0.1:5001"]
    assert ns.certs == "pki"


def test_party_without_certificates_refuses_to_start(tmp_path):
    """TLS is not optional: a rank started without certificates exits with a clear message."""
    cmd = [sys.executable, "-m", "veil.mpc.party", "--rank", "0", "--world", "3", "--addr", "127.0.0.1:5000",
           "--entry", "tests.mpc.programs:products"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "TLS is required" in res.stderr
    res = subprocess.run([*cmd, "--certs", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not found" in res.stderr


@pytest.mark.timeout(120)
def test_launch_hands_each_party_only_its_own_private_arguments():
    res = launch("tests.mpc.programs:echo_args", 2, ("public",), party_args=[(torch.zeros(2), {"k": 1}), (7,)],
                 timeout=30, wall_timeout=100)
    assert res[0] == ["str", "Tensor", "dict"]
    assert res[1] == ["str", "int"]
