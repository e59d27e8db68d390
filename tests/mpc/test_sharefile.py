"""Seed 004's workflow: owners outside the parties share data and a model to encrypted files
offline, the parties train from their own files, the result is revealed to the holder only."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import veil.mpc as mpc
from veil.mpc import certs, sharefile
from veil.mpc.errors import ProtocolError
from veil.mpc.sharefile import read_result, read_shares, write_shares

from .programs import train_from_share_files


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return d, certs.make_dev_pki(d, 2, owners=("alice", "bob", "mallory"))


def _owners_data():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(20, 3, generator=g), torch.randn(12, 3, generator=g)
    w = torch.tensor([[0.5, -1.0, 2.0]])
    return (xa, xa @ w.t() + 0.3), (xb, xb @ w.t() + 0.3)


def test_owners_outside_the_parties_train_and_only_the_holder_reads(pki, tmp_path):
    pki_dir, files = pki
    parties = [files[0].cert, files[1].cert]
    (xa, ya), (xb, yb) = _owners_data()
    fa = write_shares({"x": xa, "y": ya}, parties, tmp_path / "alice", "alice", owner=files["alice"])
    fb = write_shares({"x": xb, "y": yb}, parties, tmp_path / "bob", "bob", owner=files["bob"])
    torch.manual_seed(3)
    init = nn.Linear(3, 1)
    fm = write_shares({"weight": init.weight.detach(), "bias": init.bias.detach()}, parties, tmp_path / "model",
                      "model", owner=files["alice"])
    # no file holds plaintext: each party's file is a uniform share under AES-GCM
    raw = b"".join(p.read_bytes() for p in fa + fb + fm)
    assert xa.numpy().tobytes()[:16] not in raw
    plan = {r: {"data": [fa[r], fb[r]], "model": fm[r]} for r in range(2)}
    out = tmp_path / "result"
    assert mpc.run_local(train_from_share_files, 2, args=(plan, str(pki_dir), "alice", str(out))) == [True, True]

    ref = copy.deepcopy(init)
    x, y = torch.cat([xa, xb]), torch.cat([ya, yb])
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(ref(x), y)
        loss.backward()
        opt.step()
    result = read_result(sorted(out.glob("*.vshare")), files["alice"])
    assert abs(float(result["loss"]) - float(loss)) < 1e-3
    assert (result["weight"] - ref.weight.detach()).abs().max() < 1e-3
    # bob (another owner) and a party cannot read the result
    for other in (files["bob"], files[0]):
        with pytest.raises(ProtocolError):
            read_result(sorted(out.glob("*.vshare")), other)
    with pytest.raises(ProtocolError, match="each of the 2 parties"):
        read_result(sorted(out.glob("*.vshare"))[:1], files["alice"])


def test_tampered_swapped_mismatched_and_forged_files_are_refused(pki, tmp_path):
    _, files = pki
    parties = [files[0].cert, files[1].cert]
    x = torch.randn(4, 2)
    good = write_shares({"x": x}, parties, tmp_path / "a", "a", owner=files["alice"])
    other = write_shares({"x": x}, parties, tmp_path / "b", "b", owner=files["alice"])
    tampered = tmp_path / "t.vshare"
    data = bytearray(good[0].read_bytes())
    data[len(data) // 2] ^= 1
    tampered.write_bytes(bytes(data))
    unsigned = write_shares({"x": x}, parties, tmp_path / "u", "u")
    # mallory holds a valid owner certificate but writes files claiming to come from alice (with
    # alice's public certificate in the header) and signs them with her own key: refused
    forged = []
    for r, shares in enumerate(sharefile.split({"x": x}, 2)):
        specs, payload = sharefile._payload(shares)
        header = {"format": "veil.mpc.sharefile/1", "dataset": "d", "name": "f", "party": r, "parties": 2,
                  "frac_bits": 16, "tensors": specs, "recipient": certs.identity_uri(r, 3),
                  "owner": "urn:veil:mpc:owner:alice", "owner_cert": files["alice"].cert.read_text()}
        path = tmp_path / f"forged{r}.vshare"
        path.write_bytes(sharefile._seal(header, payload, parties[r], files["mallory"]))
        forged.append(path)

    def attempt(kind):
        def prog():
            rt = mpc.current()
            me = files[rt.rank]
            path = {"tampered": [tampered, good[1]], "swapped": [good[1], good[0]], "mixed": [good[0], other[1]],
                    "unsigned": unsigned, "forged": forged, "good": good}[kind][rt.rank]
            return read_shares(path, me, require_owner="alice" if kind in ("unsigned", "forged") else None)

        return prog

    for kind in ("tampered", "swapped", "mixed", "unsigned", "forged"):
        with pytest.raises(ProtocolError):
            mpc.run_local(attempt(kind))
    shares = mpc.run_local(attempt("good"))
    assert torch.equal(shares[0]["x"]._share + shares[1]["x"]._share, mpc.ring.encode(x, 16))
