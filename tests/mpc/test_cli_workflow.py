"""The data-owner workflow from the command line on digits: two data owners outside the computing
parties share their rows (and one owner its model) to encrypted files, the parties and the dealer
train from those files as separate processes over TLS, and only the named owner can read the loss
and the weights."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from veil.net import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS, LR = 5, 0.5

SCRIPT = textwrap.dedent(f"""
    import torch
    import torch.nn.functional as F
    from torch import nn


    def train(ctx):
        alice, bob = ctx.load("alice", owner="alice"), ctx.load("bob", owner="bob")
        x = torch.cat([alice["x"], bob["x"]])
        y = torch.cat([alice["y"], bob["y"]])
        net = ctx.load_module(nn.Linear(64, 10), "model", owner="alice")
        opt = torch.optim.SGD(net.parameters(), lr={LR})
        losses = []
        for _ in range({STEPS}):
            opt.zero_grad()
            loss = F.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().reshape(1))
        ctx.reveal({{"losses": torch.cat(losses), "weight": net.weight.detach(), "bias": net.bias.detach()}})
""")


def veil(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "veil.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    if check:
        assert res.returncode == 0, res.stderr
    return res


@pytest.mark.timeout(300)
def test_owner_share_files_train_and_only_the_holder_reads_from_the_cli(tmp_path):
    x, y = load_digits(return_X_y=True)
    x = x[:200] / 16.0
    onehot = np.eye(10)[y[:200]]
    np.savez(tmp_path / "alice.npz", x=x[:120], y=onehot[:120])
    np.savez(tmp_path / "bob.npz", x=x[120:], y=onehot[120:])
    torch.manual_seed(0)
    init = nn.Linear(64, 10)
    torch.save(init.state_dict(), tmp_path / "model.pt")
    (tmp_path / "train.py").write_text(SCRIPT)
    pki, shares, results = tmp_path / "pki", tmp_path / "shares", tmp_path / "results"

    veil("mpc", "certs", "--parties", "2", "--owners", "alice,bob", "--out", str(pki))
    for owner, data in (("alice", "alice.npz"), ("bob", "bob.npz"), ("alice", "model.pt")):
        veil("mpc", "share", str(tmp_path / data), "--parties", "2", "--certs", str(pki), "--owner", owner,
             "--out", str(shares))
    assert sorted(p.name for p in shares.iterdir()) == [f"{n}.party{r}.vshare" for n in ("alice", "bob", "model")
                                                         for r in (0, 1)]

    peers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    procs = []
    for rank in range(3):
        cmd = [sys.executable, "-m", "veil.cli", "mpc", "train", "--rank", str(rank), "--world", "3",
               "--peers", peers, "--certs", str(pki), "--timeout", "60"]
        if rank < 2:
            cmd += [str(tmp_path / "train.py"), "--shares", str(shares), "--holder", "alice",
                    "--results", str(results)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0, 0], [p.stderr.read() for p in procs]

    out = veil("mpc", "reveal", str(results), "--certs", str(pki), "--holder", "alice", "--parties", "2",
               "--out", str(tmp_path / "result.npz"))
    assert "losses" in out.stdout
    got = np.load(tmp_path / "result.npz")
    # bob, another owner, cannot read alice's result
    refused = veil("mpc", "reveal", str(results), "--certs", str(pki), "--holder", "bob", "--parties", "2",
                   "--out", str(tmp_path / "bob_result.npz"), check=False)
    assert refused.returncode == 2 and not (tmp_path / "bob_result.npz").exists()
    assert "not urn:veil:mpc:owner:bob" in refused.stderr

    ref = nn.Linear(64, 10)
    ref.load_state_dict(init.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(onehot, dtype=torch.float32)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.mse_loss(ref(xt), yt)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.abs(got["losses"] - np.array(losses)).max() < 1e-3
    assert got["losses"][-1] < got["losses"][0]
    assert np.abs(got["weight"] - ref.weight.detach().numpy()).max() < 1e-3


@pytest.mark.timeout(240)
def test_parties_naming_different_holders_stop_before_training(tmp_path):
    """Issue 19 (C): with ``--holder alice`` on one party and ``--holder bob`` on the other,
    training ran to the end, exited 0, and no one could reveal. Now the parties agree on the
    holder's certificate first: every party stops with a clear error before the script runs."""
    np.savez(tmp_path / "alice.npz", x=np.ones((4, 3)), y=np.zeros((4, 1)))
    started = tmp_path / "started"
    (tmp_path / "train.py").write_text(textwrap.dedent(f"""
        from pathlib import Path


        def train(ctx):
            Path({str(started)!r}).with_suffix(f".{{ctx.rank}}").write_text("training")
            data = ctx.load("alice", owner="alice")
            ctx.reveal({{"x": data["x"]}})
    """))
    pki, shares, results = tmp_path / "pki", tmp_path / "shares", tmp_path / "results"
    veil("mpc", "certs", "--parties", "2", "--owners", "alice,bob", "--out", str(pki))
    veil("mpc", "share", str(tmp_path / "alice.npz"), "--parties", "2", "--certs", str(pki), "--owner", "alice",
         "--out", str(shares))
    peers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    procs = []
    for rank, holder in ((0, "alice"), (1, "bob"), (2, None)):
        cmd = [sys.executable, "-m", "veil.cli", "mpc", "train", "--rank", str(rank), "--world", "3",
               "--peers", peers, "--certs", str(pki), "--timeout", "60"]
        if holder is not None:
            cmd += [str(tmp_path / "train.py"), "--shares", str(shares), "--holder", holder,
                    "--results", str(results)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    try:
        codes = [p.wait(timeout=200) for p in procs]
        errs = [p.stderr.read() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes[:2] == [2, 2], errs
    assert "disagree on the result holder (this party names holder urn:veil:mpc:owner:alice" in errs[0], errs[0]
    assert "disagree on the result holder (this party names holder urn:veil:mpc:owner:bob" in errs[1], errs[1]
    assert codes[2] == 3, errs[2]  # the dealer: its parties left
    assert not list(tmp_path.glob("started.*"))  # stopped before the script's train(ctx)
    assert not results.exists() or not any(results.iterdir())


def test_a_party_missing_its_script_or_shares_stops_before_connecting(tmp_path):
    (tmp_path / "train.py").write_text("def train(ctx):\n    pass\n")
    (tmp_path / "shares").mkdir()
    veil("mpc", "certs", "--parties", "2", "--out", str(tmp_path / "pki"))
    peers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    base = ["mpc", "train", "--rank", "0", "--world", "3", "--peers", peers, "--certs", str(tmp_path / "pki"),
            "--timeout", "20"]
    for script, shares, named in (("nope.py", "shares", "nope.py"), ("train.py", "nowhere", "nowhere")):
        res = veil(*base, str(tmp_path / script), "--shares", str(tmp_path / shares), check=False)
        assert res.returncode == 2 and f"{named} does not exist" in res.stderr
