"""The data-owner workflow: owners outside the parties share data and a model to encrypted files
offline, the parties train from their own files, the result is revealed to the holder only."""

import copy
import datetime as dt

import pytest
import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
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
    fa = write_shares({"x": xa, "y": ya}, parties, tmp_path / "alice", "alice", ca=files[0].ca, owner=files["alice"])
    fb = write_shares({"x": xb, "y": yb}, parties, tmp_path / "bob", "bob", ca=files[0].ca, owner=files["bob"])
    torch.manual_seed(3)
    init = nn.Linear(3, 1)
    fm = write_shares({"weight": init.weight.detach(), "bias": init.bias.detach()}, parties, tmp_path / "model",
                      "model", ca=files[0].ca, owner=files["alice"])
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
    result = read_result(sorted(out.glob("*.vshare")), files["alice"], parties=2)
    assert abs(float(result["loss"]) - float(loss)) < 1e-3
    assert (result["weight"] - ref.weight.detach()).abs().max() < 1e-3
    # bob (another owner) and a party cannot read the result
    for other in (files["bob"], files[0]):
        with pytest.raises(ProtocolError):
            read_result(sorted(out.glob("*.vshare")), other, parties=2)
    with pytest.raises(ProtocolError, match="each of the 2 parties"):
        read_result(sorted(out.glob("*.vshare"))[:1], files["alice"], parties=2)


def test_tampered_swapped_mismatched_and_forged_files_are_refused(pki, tmp_path):
    _, files = pki
    parties = [files[0].cert, files[1].cert]
    x = torch.randn(4, 2)
    good = write_shares({"x": x}, parties, tmp_path / "a", "a", ca=files[0].ca, owner=files["alice"])
    other = write_shares({"x": x}, parties, tmp_path / "b", "b", ca=files[0].ca, owner=files["alice"])
    tampered = tmp_path / "t.vshare"
    data = bytearray(good[0].read_bytes())
    data[len(data) // 2] ^= 1
    tampered.write_bytes(bytes(data))
    unsigned = write_shares({"x": x}, parties, tmp_path / "u", "u", ca=files[0].ca)
    # mallory holds a valid owner certificate but writes files claiming to come from alice (with
    # alice's public certificate in the header) and signs them with her own key: refused
    forged = []
    for r, shares in enumerate(sharefile.split({"x": x}, 2)):
        specs, payload = sharefile._payload(shares)
        header = {"format": "veil.mpc.sharefile/1", "dataset": "d", "name": "f", "party": r, "parties": 2,
                  "frac_bits": 16, "tensors": specs, "recipient": certs.identity_uri(r, 3),
                  "owner": "urn:veil:mpc:owner:alice", "owner_cert": files["alice"].cert.read_text()}
        path = tmp_path / f"forged{r}.vshare"
        path.write_bytes(sharefile._seal(header, payload, sharefile._load_cert(parties[r]), files["mallory"]))
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


# ---- found by the attack review of share files ----------------------------------------------------


def _reveal_prog(pki_dir, files, out, value):
    def prog():
        rt = mpc.current()
        from veil.mpc.sharefile import write_result

        t = mpc.share(torch.tensor([value]) if rt.rank == 0 else None, 0, shape=(1,))
        write_result({"w": t}, files["alice"].cert, out, "result", files[rt.rank])
        return True

    return prog


def test_forged_partial_and_mixed_results_are_refused(pki, tmp_path):
    pki_dir, files = pki
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    mpc.run_local(_reveal_prog(pki_dir, files, run_a, 1.0))
    mpc.run_local(_reveal_prog(pki_dir, files, run_b, 5.0))
    got = read_result(sorted(run_a.glob("*.vshare")), files["alice"], parties=2)
    assert abs(float(got["w"]) - 1.0) < 1e-4
    # one party alone claiming a 1-party computation
    specs, payload = sharefile._payload({"w": torch.tensor([42 << 16])})
    header = {"format": "veil.mpc.sharefile/1", "dataset": "x", "name": "result", "party": 0, "parties": 1,
              "frac_bits": 16, "tensors": specs, "recipient": "urn:veil:mpc:owner:alice",
              "owner": certs.identity_uri(0, 3), "owner_cert": files[0].cert.read_text()}
    lone = tmp_path / "lone.vshare"
    lone.write_bytes(sharefile._seal(header, payload, sharefile._load_cert(files["alice"].cert), files[0]))
    with pytest.raises(ProtocolError):
        read_result([lone], files["alice"], parties=1)
    with pytest.raises(ProtocolError):
        read_result([lone], files["alice"], parties=2)
    # party 0's file of one reveal with party 1's file of another
    mixed = [run_a / "result.party0.vshare", run_b / "result.party1.vshare"]
    with pytest.raises(ProtocolError, match="different reveals"):
        read_result(mixed, files["alice"], parties=2)


def test_recipients_must_hold_certificates_of_the_ca(pki, tmp_path):
    _, files = pki
    rogue = certs.make_dev_pki(tmp_path / "rogue", 2, owners=("alice",))  # same identities, another CA
    with pytest.raises(ProtocolError, match="not issued by the CA"):
        write_shares({"x": torch.ones(2)}, [rogue[0].cert, files[1].cert], tmp_path / "o", "x", ca=files[0].ca)

    def prog():
        rt = mpc.current()
        from veil.mpc.sharefile import write_result

        write_result({"w": mpc.from_public(torch.ones(1))}, rogue["alice"].cert, tmp_path / "r", "result",
                     files[rt.rank])

    with pytest.raises(ProtocolError, match="not issued by the CA"):
        mpc.run_local(prog)


def test_expired_owner_certificates_and_malleated_files_are_refused(pki, tmp_path):
    pki_dir, files = pki
    ca_cert, ca_key = certs.load_ca(pki_dir)
    cert, key = certs.issue(ca_cert, ca_key, certs.owner("old"), days=1,
                            valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    (tmp_path / "owner-old.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs._write_key(tmp_path / "owner-old.key", key)
    old = certs.TLSFiles(files[0].ca, tmp_path / "owner-old.pem", tmp_path / "owner-old.key")
    expired = write_shares({"x": torch.ones(2)}, [files[0].cert, files[1].cert], tmp_path / "e", "e", ca=files[0].ca,
                           owner=old)
    signed = write_shares({"x": torch.ones(2)}, [files[0].cert, files[1].cert], tmp_path / "s", "s", ca=files[0].ca,
                          owner=files["alice"])
    unsigned = write_shares({"x": torch.ones(2)}, [files[0].cert, files[1].cert], tmp_path / "u", "u",
                            ca=files[0].ca)
    with pytest.raises(ProtocolError, match="not valid now"):
        sharefile._open(expired[0].read_bytes(), files[0])
    # the high-s twin of a valid signature
    data = signed[0].read_bytes()
    n = int.from_bytes(data[-2:], "big")
    r, s_ = decode_dss_signature(data[-2 - n : -2])
    twin = encode_dss_signature(r, sharefile.CURVE_ORDER["secp256r1"] - s_)
    with pytest.raises(ProtocolError, match="low-s"):
        sharefile._open(data[: -2 - n] + twin + len(twin).to_bytes(2, "big"), files[0])
    # the ephemeral key re-encoded in compressed form
    raw = unsigned[0].read_bytes()
    pos = len(sharefile.MAGIC) + 4 + int.from_bytes(raw[8:12], "big")
    point = raw[pos + 2 : pos + 67]
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    short = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    recoded = raw[:pos] + len(short).to_bytes(2, "big") + short + raw[pos + 67 :]
    with pytest.raises(ProtocolError):
        sharefile._open(recoded, files[0])


@pytest.mark.parametrize("patch", [
    {"parties": 10**9}, {"parties": "2"}, {"owner_cert": None}, {"tensors": None}, {"tensors": [{"name": "x",
                                                                                                  "shape": [-1, -8]}]},
    {"tensors": [{"name": "x", "shape": ["1e3"]}]}, {"name": "../escape"}, {"party": True},
])
def test_malformed_headers_give_protocol_errors(pki, tmp_path, patch):
    _, files = pki
    specs, payload = sharefile._payload({"x": torch.zeros(2, dtype=torch.int64)})
    header = {"format": "veil.mpc.sharefile/1", "dataset": "d", "name": "x", "party": 0, "parties": 2,
              "frac_bits": 16, "tensors": specs, "recipient": certs.identity_uri(0, 3), "owner": None,
              "owner_cert": None, **patch}
    if patch == {"owner_cert": None}:
        header["owner"] = "urn:veil:mpc:owner:alice"
    data = sharefile._seal(header, payload, sharefile._load_cert(files[0].cert), None)
    with pytest.raises(ProtocolError):
        sharefile._open(data, files[0])


def test_deeply_nested_header_is_a_protocol_error(pki):
    _, files = pki
    head = b"[" * 200_000 + b"]" * 200_000
    data = sharefile.MAGIC + len(head).to_bytes(4, "big") + head + bytes(80) + (0).to_bytes(2, "big")
    with pytest.raises(ProtocolError):
        sharefile._open(data, files[0])


def test_renamed_or_other_owner_files_are_refused_by_name_and_owner(pki, tmp_path):
    _, files = pki
    parties = [files[0].cert, files[1].cert]
    model = write_shares({"x": torch.ones(3)}, parties, tmp_path / "m", "model", ca=files[0].ca, owner=files["alice"])
    data = write_shares({"x": torch.ones(3)}, parties, tmp_path / "d", "alice", ca=files[0].ca, owner=files["alice"])
    forged = write_shares({"x": torch.ones(3)}, parties, tmp_path / "f", "alice", ca=files[0].ca)

    def load(paths, name=None, owner=None):
        def prog():
            rt = mpc.current()
            return read_shares(paths[rt.rank], files[rt.rank], name=name, require_owner=owner)

        return prog

    with pytest.raises(ProtocolError, match="holds dataset 'model'"):
        mpc.run_local(load(model, name="alice"))
    # one party's file signed by alice, the other's unsigned: the parties notice the mix
    with pytest.raises(ProtocolError, match="different share files"):
        mpc.run_local(load([data[0], forged[1]]))
    with pytest.raises(ProtocolError, match="names are"):
        write_shares({"x": torch.ones(1)}, parties, tmp_path, "../escaped", ca=files[0].ca)


def test_a_csv_label_column_outside_the_file_is_a_protocol_error(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("1,2,0\n3,4,1\n")
    assert sharefile.load_tensors(path, -1)["y"].tolist() == [0.0, 1.0]
    for column in (3, -4):
        with pytest.raises(ProtocolError, match="no label column"):
            sharefile.load_tensors(path, column)
