"""Share files: data owners who are not computing parties hand their data (or a model) to the
parties offline, and parties hand results to a named holder, without anyone else reading them.

Protocol (owner -> parties offline, parties compute, a named holder reads the result):

1. The owner fixed-point encodes its tensors and splits each into n additive shares over
   Z_2^64 (n - 1 uniform from the CSPRNG, the last the difference), offline.
2. Share r goes into a file encrypted to party r's certificate: an ephemeral ECDH key (P-256,
   the curve of the certificates) with the party's public key, HKDF-SHA256, AES-256-GCM
   (`cryptography`). The header (dataset id, name, party, number of parties, frac_bits, tensor
   names and shapes, recipient and owner identities) is authenticated as associated data. If
   the owner has a certificate, it signs the whole file (ECDSA-SHA256) and the parties check
   the signature against the CA: then a file cannot be forged by someone else.
3. Each party decrypts only its own file with its own key and gets `MPCTensor` shares (a
   single file reveals nothing: its shares are uniform); `check_same_dataset` has the parties
   compare the files' identities over their TLS links, so no party trains on a mismatched split.
4. A result is revealed to a holder outside the parties the same way. Before training, the
   parties agree on the holder's certificate (`agree_on_holder`, one round, in `PartyContext`):
   different holders stop every party with `AgreementError`. Each party then writes its share
   of the result encrypted to that certificate (`write_result`), and only the holder can
   decrypt and add them (`read_result`).

What each sees: a party sees one uniform share of each tensor, the public header (names,
shapes, number of rows) and whom it comes from; anyone else sees ciphertext and the header.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.mpc import primitives as P
from veil.mpc import ring
from veil.mpc.certs import Identity, TLSFiles, cert_identity, identity_for
from veil.mpc.errors import AgreementError, ProtocolError
from veil.mpc.tensor import MPCTensor
from veil.names import NAME_RULE, is_name

MAGIC = b"VEILSHR1"
MAX_HEADER = 1 << 20
SUFFIX = ".vshare"


MAX_PARTIES = 64
MAX_TENSORS = 256
MAX_DIMS = 8
EC_POINT_BYTES = 65  # uncompressed P-256 point


def check_name(name: str) -> str:
    """Dataset and result names are plain file-name stems (they never leave the output directory)."""
    if not is_name(name):
        raise ProtocolError(f"names are {NAME_RULE}, got {name!r}")
    return name


def _load_cert(path: Path | str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _identity_of(cert_path: Path | str) -> Identity:
    ident = cert_identity(Path(cert_path).read_bytes())
    if ident is None:
        raise ProtocolError(f"{cert_path} names no veil.mpc identity")
    return ident


def _verify_cert(cert: x509.Certificate, ca_path: Path | str, what: str) -> None:
    """``cert`` must be issued by the CA, valid now, and not a CA itself."""
    try:
        cert.verify_directly_issued_by(_load_cert(ca_path))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProtocolError(f"{what}: certificate not issued by the CA ({exc or type(exc).__name__})") from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ProtocolError(f"{what}: certificate not valid now")
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ProtocolError(f"{what}: a CA certificate cannot be an identity")
    except x509.ExtensionNotFound:
        pass


def _recipient(cert_path: Path | str, ca: Path | str) -> tuple[x509.Certificate, Identity]:
    """A recipient certificate checked against the CA before anything is encrypted to it."""
    cert = _load_cert(cert_path)
    _verify_cert(cert, ca, str(cert_path))
    return cert, _identity_of(cert_path)


def _key(shared: bytes, header: bytes, eph_pub: bytes) -> bytes:
    info = b"veil-mpc-share-file" + hashlib.sha256(header).digest() + hashlib.sha256(eph_pub).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _low_s(sig: bytes, curve: ec.EllipticCurve) -> bytes:
    """The low-s form of an ECDSA signature (one valid encoding per signature)."""
    r, s_ = decode_dss_signature(sig)
    n = CURVE_ORDER[curve.name]
    return encode_dss_signature(r, min(s_, n - s_))


CURVE_ORDER = {"secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551}


def _seal(header: dict, payload: bytes, recipient: x509.Certificate, owner: TLSFiles | None) -> bytes:
    """Encrypt ``payload`` to the recipient's certificate, header as associated data; sign if owner."""
    pub = recipient.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name not in CURVE_ORDER:
        raise ProtocolError("share files need a P-256 certificate key")
    head = json.dumps(header, sort_keys=True).encode()
    eph = ec.generate_private_key(pub.curve)
    eph_pub = eph.public_key().public_bytes(serialization.Encoding.X962,
                                            serialization.PublicFormat.UncompressedPoint)
    nonce = os.urandom(12)
    body = AESGCM(_key(eph.exchange(ec.ECDH(), pub), head, eph_pub)).encrypt(nonce, payload, MAGIC + head + eph_pub)
    blob = MAGIC + len(head).to_bytes(4, "big") + head + len(eph_pub).to_bytes(2, "big") + eph_pub + nonce + body
    sig = b""
    if owner is not None:
        key = serialization.load_pem_private_key(Path(owner.key).read_bytes(), password=None)
        sig = _low_s(key.sign(blob, ec.ECDSA(hashes.SHA256())), key.curve)
    return blob + sig + len(sig).to_bytes(2, "big")


def _check_header(header: object) -> dict:
    """Every field of an untrusted header with the right type and range (ProtocolError otherwise)."""
    if not isinstance(header, dict) or header.get("format") != "veil.mpc.sharefile/1":
        raise ProtocolError("not a veil.mpc share file header")

    def integer(key: str, lo: int, hi: int) -> int:
        v = header.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ProtocolError(f"header field {key!r} must be an integer in [{lo}, {hi}]")
        return v

    parties = integer("parties", 2, MAX_PARTIES)
    integer("party", 0, parties - 1)
    integer("frac_bits", 0, 62)
    for key in ("dataset", "recipient"):
        if not isinstance(header.get(key), str) or len(header[key]) > 256:
            raise ProtocolError(f"header field {key!r} must be a short string")
    check_name(header.get("name"))
    if (header.get("owner") is None) != (header.get("owner_cert") is None) or not all(
            isinstance(header.get(k), str | type(None)) for k in ("owner", "owner_cert")):
        raise ProtocolError("header fields 'owner' and 'owner_cert' must be both strings or both null")
    specs = header.get("tensors")
    if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_TENSORS:
        raise ProtocolError(f"header field 'tensors' must list 1 to {MAX_TENSORS} tensors")
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or len(spec["name"]) > 256:
            raise ProtocolError("each tensor needs a name")
        shape = spec.get("shape")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 40 for d in shape):
            raise ProtocolError(f"tensor {spec['name']!r}: shape must be at most {MAX_DIMS} non-negative integers")
    return header


def _open(data: bytes, me: TLSFiles) -> tuple[dict, bytes]:
    """Check and decrypt a sealed file for ``me``; raises ProtocolError on anything wrong."""
    try:
        if len(data) < len(MAGIC) + 6 or not data.startswith(MAGIC):
            raise ValueError("not a veil.mpc share file")
        sig_len = int.from_bytes(data[-2:], "big")
        blob, sig = data[: len(data) - 2 - sig_len], data[len(data) - 2 - sig_len : -2]
        pos = len(MAGIC)
        n = int.from_bytes(blob[pos : pos + 4], "big")
        if n > MAX_HEADER:
            raise ValueError("header too large")
        head = blob[pos + 4 : pos + 4 + n]
        header = _check_header(json.loads(head))
        pos += 4 + n
        k = int.from_bytes(blob[pos : pos + 2], "big")
        eph_pub, nonce, body = blob[pos + 2 : pos + 2 + k], blob[pos + 2 + k : pos + 14 + k], blob[pos + 14 + k :]
        if k != EC_POINT_BYTES or eph_pub[:1] != b"\x04" or len(nonce) != 12:
            raise ValueError("the ephemeral key must be an uncompressed P-256 point")
    except (ValueError, UnicodeDecodeError, IndexError, RecursionError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError(f"malformed share file: {exc or type(exc).__name__}") from None
    mine = _identity_of(me.cert)
    if header["recipient"] != mine.uri():
        raise ProtocolError(f"share file is for {header['recipient']}, not {mine.uri()}")
    if header["owner"] is not None:
        _check_signature(blob, sig, header["owner"], header["owner_cert"], me.ca)
    elif sig:
        raise ProtocolError("an unsigned share file carries a signature")
    key = serialization.load_pem_private_key(Path(me.key).read_bytes(), password=None)
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, eph_pub)
        aead = AESGCM(_key(key.exchange(ec.ECDH(), peer), head, eph_pub))
        payload = aead.decrypt(nonce, body, MAGIC + head + eph_pub)
    except (InvalidTag, ValueError) as exc:
        raise ProtocolError("share file failed its integrity check (tampered, or not for this key)") from exc
    return header, payload


def _check_signature(blob: bytes, sig: bytes, owner_uri: str, owner_cert_pem: str, ca_path: Path) -> None:
    """The signer's certificate (in the header) must come from the CA, be valid, name the signer,
    and sign the file with a low-s signature."""
    try:
        cert = x509.load_pem_x509_certificate(owner_cert_pem.encode())
        ident = cert_identity(owner_cert_pem.encode())
        if ident is None or ident.uri() != owner_uri:
            raise ValueError("the certificate names another identity")
        _, s_ = decode_dss_signature(sig)
        if s_ > CURVE_ORDER["secp256r1"] // 2:
            raise ValueError("not a low-s signature")
        cert.public_key().verify(sig, blob, ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProtocolError(f"share file signature of {owner_uri} does not verify: {exc or 'bad signature'}") from None
    _verify_cert(cert, ca_path, owner_uri)


def _payload(shares: dict[str, torch.Tensor]) -> tuple[list[dict], bytes]:
    specs, parts = [], []
    for name, t in shares.items():
        specs.append({"name": name, "shape": list(t.shape)})
        parts.append(t.contiguous().numpy().tobytes())
    return specs, b"".join(parts)


def _unpayload(specs: list[dict], payload: bytes) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for spec in specs:
        shape = tuple(spec["shape"])
        n = 8
        for d in shape:
            n *= d
        if off + n > len(payload):
            raise ProtocolError("share file payload shorter than its header says")
        out[spec["name"]] = torch.frombuffer(bytearray(payload[off : off + n]), dtype=torch.int64).reshape(shape)
        off += n
    if off != len(payload):
        raise ProtocolError("share file payload longer than its header says")
    return out


def split(tensors: dict[str, torch.Tensor], n_parties: int, frac_bits: int = ring.DEFAULT_FRAC_BITS,
          ) -> list[dict[str, torch.Tensor]]:
    """Additive shares of each (fixed-point encoded) tensor for n parties; randomness from the CSPRNG."""
    prg = ring.PRG()
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n_parties)]
    for name, t in tensors.items():
        enc = ring.encode(torch.as_tensor(t).detach(), frac_bits)
        rest = enc.clone()
        for r in range(n_parties - 1):
            out[r][name] = prg.random(enc.shape)
            rest = rest - out[r][name]
        out[n_parties - 1][name] = rest
    return out


def write_shares(tensors: dict[str, torch.Tensor], party_certs: list[Path | str], out_dir: Path | str, name: str,
                 ca: Path | str, owner: TLSFiles | None = None, frac_bits: int = ring.DEFAULT_FRAC_BITS) -> list[Path]:
    """Split ``tensors`` for the parties whose certificates are given (in rank order, each checked
    against the CA ``ca``) and write one encrypted file per party, ``<name>.party<r>.vshare``;
    signed if ``owner`` is given."""
    check_name(name)
    n = len(party_certs)
    if not 2 <= n <= MAX_PARTIES:
        raise ProtocolError(f"2 to {MAX_PARTIES} computing parties are needed")
    recipients = []
    for r, path in enumerate(party_certs):
        cert, ident = _recipient(path, ca)
        if ident != identity_for(r, n + 1):
            raise ProtocolError(f"{path} is not the certificate of party {r}")
        recipients.append((cert, ident))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = os.urandom(16).hex()
    owner_ident = _identity_of(owner.cert) if owner is not None else None
    paths = []
    for r, ((cert, ident), shares) in enumerate(zip(recipients, split(tensors, n, frac_bits), strict=True)):
        specs, payload = _payload(shares)
        header = {"format": "veil.mpc.sharefile/1", "dataset": dataset, "name": name, "party": r, "parties": n,
                  "frac_bits": frac_bits, "tensors": specs, "recipient": ident.uri(),
                  "owner": owner_ident.uri() if owner_ident else None,
                  "owner_cert": Path(owner.cert).read_text() if owner is not None else None}
        path = out_dir / f"{name}.party{r}{SUFFIX}"
        path.write_bytes(_seal(header, payload, cert, owner))
        paths.append(path)
    return paths


def read_shares(path: Path | str, me: TLSFiles, name: str | None = None,
                require_owner: str | None = None) -> dict[str, MPCTensor]:
    """This party's shares from its file (the runtime's rank and frac_bits must match the file's).

    ``name`` must be the dataset's name in the header if given; ``require_owner`` (an owner
    name) refuses files not signed by that owner."""
    rt = P.current()
    header, payload = _open(Path(path).read_bytes(), me)
    if name is not None and header["name"] != name:
        raise ProtocolError(f"{path} holds dataset {header['name']!r}, not {name!r}")
    if require_owner is not None and header["owner"] != Identity("owner", require_owner).uri():
        raise ProtocolError(f"{path} is not signed by owner {require_owner}")
    if header["party"] != rt.rank or header["parties"] != rt.n or header["frac_bits"] != rt.frac_bits:
        raise ProtocolError(f"{path} holds party {header['party']}'s shares of a {header['parties']}-party "
                            f"split; this is party {rt.rank} of {rt.n}")
    check_same_dataset(header)
    return {k: MPCTensor(v) for k, v in _unpayload(header["tensors"], payload).items()}


def agree(fields: object, what: str) -> None:
    """Every party checks that all parties hold the same ``fields`` (JSON values), or raises
    `AgreementError` saying ``what`` differs; one round: the parties exchange SHA-256 digests
    over their TLS links, so if any two differ, every party sees it and stops."""
    rt = P.current()
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()
    mine = torch.frombuffer(bytearray(digest), dtype=torch.int64).clone()
    if any(not torch.equal(mine, other) for other in rt.comm.exchange(mine)):
        raise AgreementError(f"party {rt.rank}: the parties disagree on {what}")


def check_same_dataset(header: dict) -> None:
    """Every party checks that all parties loaded shares of the same split, from the same owner
    (one round)."""
    fields = [header[k] for k in ("dataset", "name", "tensors", "owner", "owner_cert", "parties", "frac_bits")]
    agree(fields, f"the split of {header['name']!r} (they loaded different share files)")


def agree_on_holder(holder_cert: Path | str | None, ca: Path | str) -> Identity | None:
    """Before anything is computed, the parties check that they reveal to the same holder, by
    its certificate (identity and SHA-256 of the DER), or all to none (one round, `agree`);
    then the certificate must be valid under the CA. Returns the holder's identity.

    Without this, parties started with different ``--holder`` values train to the end and
    write result files that no one holder can add up."""
    cert, fields = None, None
    if holder_cert is not None:
        try:
            cert = _load_cert(holder_cert)
            ident = cert_identity(cert.public_bytes(serialization.Encoding.PEM))
            fields = [ident.uri() if ident else None, hashlib.sha256(cert.public_bytes(
                serialization.Encoding.DER)).hexdigest()]
        except (OSError, ValueError) as exc:
            fields = ["unreadable", Path(holder_cert).name, type(exc).__name__]
    mine = "no holder" if fields is None else f"holder {fields[0]} ({Path(holder_cert).name})"
    agree(fields, f"the result holder (this party names {mine})")
    if cert is None:
        if holder_cert is not None:
            raise ProtocolError(f"holder certificate {holder_cert} is missing or not a PEM certificate")
        return None
    return _recipient(holder_cert, ca)[1]


def _run_id() -> str:
    """A value every party agrees on for one reveal (each contributes randomness; one round)."""
    rt = P.current()
    mine = torch.frombuffer(bytearray(os.urandom(16)), dtype=torch.int64).clone()
    parts = rt.comm.exchange(mine)
    return hashlib.sha256(b"".join(p.numpy().tobytes() for p in parts)).hexdigest()


def write_result(tensors: dict[str, MPCTensor], holder_cert: Path | str, out_dir: Path | str, name: str,
                 me: TLSFiles) -> Path:
    """This party's shares of results, encrypted to the holder (checked against the CA) and signed."""
    rt = P.current()
    check_name(name)
    cert, holder = _recipient(holder_cert, me.ca)
    run = _run_id()
    specs, payload = _payload({k: v._share.detach() for k, v in tensors.items()})
    header = {"format": "veil.mpc.sharefile/1", "dataset": run, "name": name, "party": rt.rank, "parties": rt.n,
              "frac_bits": rt.frac_bits, "tensors": specs, "recipient": holder.uri(),
              "owner": _identity_of(me.cert).uri(), "owner_cert": Path(me.cert).read_text()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.party{rt.rank}{SUFFIX}"
    path.write_bytes(_seal(header, payload, cert, me))
    return path


def read_result(paths: list[Path | str], me: TLSFiles, parties: int) -> dict[str, torch.Tensor]:
    """The holder adds the parties' shares: exactly one file from each of the ``parties`` parties
    (the holder's own expectation), each signed by that party, all from the same reveal."""
    if not 2 <= parties <= MAX_PARTIES:
        raise ProtocolError(f"2 to {MAX_PARTIES} parties")
    parts = []
    for p in paths:
        header, payload = _open(Path(p).read_bytes(), me)
        parts.append((header, _unpayload(header["tensors"], payload)))
    ranks = sorted(h["party"] for h, _ in parts)
    if ranks != list(range(parties)):
        raise ProtocolError(f"need one result file from each of the {parties} parties, got parties {ranks}")
    first = parts[0][0]
    for h, _ in parts:
        same = all(h[k] == first[k] for k in ("dataset", "name", "parties", "frac_bits", "tensors"))
        if not same or h["parties"] != parties or h["owner"] != identity_for(h["party"], parties + 1).uri():
            raise ProtocolError("result files from different reveals, or not signed by their party")
    out = {}
    for spec in first["tensors"]:
        total = sum(s[spec["name"]] for _, s in parts)
        out[spec["name"]] = ring.decode(total, first["frac_bits"])
    return out


def load_tensors(path: Path | str, label_column: int | None = None) -> dict[str, torch.Tensor]:
    """An owner's data or model as named float tensors: ``.npz`` (every array), ``.csv`` (numbers;
    ``label_column`` splits off ``y``), MNIST IDX (``*-ubyte`` / ``.idx``, gzip or not) or ``.pt``
    (a state dict of tensors)."""
    import numpy as np

    from veil.mpc.idx import read_idx

    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith(".npz"):
            with np.load(p, allow_pickle=False) as z:
                return {k: torch.as_tensor(z[k], dtype=torch.float64) for k in z.files}
        if name.endswith(".csv"):
            arr = np.loadtxt(p, delimiter=",", ndmin=2, dtype=np.float64)
            if label_column is None:
                return {"x": torch.as_tensor(arr)}
            if not -arr.shape[1] <= label_column < arr.shape[1]:
                raise ProtocolError(f"{path} has {arr.shape[1]} columns: no label column {label_column} "
                                    f"(0..{arr.shape[1] - 1}, or -1 for the last)")
            y = arr[:, label_column]
            return {"x": torch.as_tensor(np.delete(arr, label_column % arr.shape[1], axis=1)), "y": torch.as_tensor(y)}
        if name.endswith(".pt"):
            state = torch.load(p, weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError("a .pt file must hold a dict of tensors (a state dict)")
            return {k: v.detach().to(torch.float64) for k, v in state.items()}
        if "ubyte" in name or name.endswith((".idx", ".idx.gz")):
            return {"x": read_idx(p).to(torch.float64)}
    except (OSError, ValueError, KeyError) as exc:
        raise ProtocolError(f"cannot read {path}: {exc}") from exc
    raise ProtocolError(f"unknown data format {p.suffix!r}: use .npz, .csv, .pt or MNIST IDX")


class PartyContext:
    """What a party's training script gets from ``veil mpc train``: its own share files and a way
    to reveal results to the holder only (and nothing that holds another party's shares)."""

    def __init__(self, shares_dir: Path | str, me: TLSFiles, holder_cert: Path | str | None, out_dir: Path | str):
        """Made inside the party runtime: first agrees on the holder with the other parties
        (`agree_on_holder`, one round), so a mismatch stops every party before training."""
        self.holder = agree_on_holder(holder_cert, me.ca)
        self.shares_dir, self.me = Path(shares_dir), me
        self.holder_cert, self.out_dir = holder_cert, Path(out_dir)

    @property
    def rank(self) -> int:
        """This party's rank."""
        return P.current().rank

    def datasets(self) -> list[str]:
        """Names of the share files available to this party (``<name>.party<r>.vshare``)."""
        tail = f".party{self.rank}{SUFFIX}"
        return sorted(p.name[: -len(tail)] for p in self.shares_dir.glob(f"*{tail}"))

    def load(self, name: str, owner: str | None = None) -> dict[str, MPCTensor]:
        """This party's shares of dataset or model ``name`` (checked to be the same split everywhere;
        signed by ``owner`` if given)."""
        check_name(name)
        return read_shares(self.shares_dir / f"{name}.party{self.rank}{SUFFIX}", self.me, name=name,
                           require_owner=owner)

    def load_module(self, module, name: str, owner: str | None = None):
        """``module`` (the same architecture as the owner's) with its parameters and floating
        buffers replaced by this party's shares of model ``name``."""
        from veil.mpc.nn import assign_shares

        tensors = self.load(name, owner)
        state = module.state_dict()
        if set(tensors) != {k for k, v in state.items() if v.is_floating_point()}:
            raise ProtocolError(f"model {name!r} holds {sorted(tensors)}, the module expects {sorted(state)}")
        for key, t in tensors.items():
            if tuple(t.shape) != tuple(state[key].shape):
                raise ProtocolError(f"model {name!r}: {key} has shape {tuple(t.shape)}, "
                                    f"expected {tuple(state[key].shape)}")
        return assign_shares(module, tensors)

    def reveal(self, tensors: dict[str, MPCTensor], name: str = "result") -> Path:
        """Write this party's shares of ``tensors`` encrypted to the holder."""
        if self.holder_cert is None:
            raise ProtocolError("no --holder given: results cannot be revealed to anyone")
        return write_result(tensors, self.holder_cert, self.out_dir, name, self.me)
