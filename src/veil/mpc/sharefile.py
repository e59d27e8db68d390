"""Share files: data owners who are not computing parties hand their data (or a model) to the
parties offline, and parties hand results to a named holder, without anyone else reading them.

Protocol (seed 004's workflow):

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
4. A result is revealed to a holder outside the parties the same way: each party writes its
   share of the result encrypted to the holder's certificate (`write_result`), and only the
   holder can decrypt and add them (`read_result`).

What each sees: a party sees one uniform share of each tensor, the public header (names,
shapes, number of rows) and whom it comes from; anyone else sees ciphertext and the header.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from veil.mpc import primitives as P
from veil.mpc import ring
from veil.mpc.certs import Identity, TLSFiles, cert_identity, identity_for
from veil.mpc.errors import ProtocolError
from veil.mpc.tensor import MPCTensor

MAGIC = b"VEILSHR1"
MAX_HEADER = 1 << 20
SUFFIX = ".vshare"


@dataclass(frozen=True)
class ShareFile:
    """A decrypted share file: its header and this recipient's int64 share of each tensor."""

    header: dict
    shares: dict[str, torch.Tensor]


def _load_cert(path: Path | str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _identity_of(cert_path: Path | str) -> Identity:
    ident = cert_identity(Path(cert_path).read_bytes())
    if ident is None:
        raise ProtocolError(f"{cert_path} names no veil.mpc identity")
    return ident


def _key(shared: bytes, header: bytes) -> bytes:
    info = b"veil-mpc-share-file" + hashlib.sha256(header).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _seal(header: dict, payload: bytes, recipient_cert: Path | str, owner: TLSFiles | None) -> bytes:
    """Encrypt ``payload`` to the recipient's certificate, header as associated data; sign if owner."""
    cert = _load_cert(recipient_cert)
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise ProtocolError(f"{recipient_cert}: share files need an EC certificate key")
    head = json.dumps(header, sort_keys=True).encode()
    eph = ec.generate_private_key(pub.curve)
    eph_pub = eph.public_key().public_bytes(serialization.Encoding.X962,
                                            serialization.PublicFormat.UncompressedPoint)
    nonce = os.urandom(12)
    body = AESGCM(_key(eph.exchange(ec.ECDH(), pub), head)).encrypt(nonce, payload, MAGIC + head)
    blob = MAGIC + len(head).to_bytes(4, "big") + head + len(eph_pub).to_bytes(2, "big") + eph_pub + nonce + body
    sig = b""
    if owner is not None:
        key = serialization.load_pem_private_key(Path(owner.key).read_bytes(), password=None)
        sig = key.sign(blob, ec.ECDSA(hashes.SHA256()))
    return blob + sig + len(sig).to_bytes(2, "big")


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
        header = json.loads(head)
        pos += 4 + n
        k = int.from_bytes(blob[pos : pos + 2], "big")
        eph_pub, nonce, body = blob[pos + 2 : pos + 2 + k], blob[pos + 2 + k : pos + 14 + k], blob[pos + 14 + k :]
        if not isinstance(header, dict) or len(nonce) != 12:
            raise ValueError("malformed header")
    except (ValueError, UnicodeDecodeError, IndexError) as exc:
        raise ProtocolError(f"malformed share file: {exc}") from None
    mine = _identity_of(me.cert)
    if header.get("recipient") != mine.uri():
        raise ProtocolError(f"share file is for {header.get('recipient')}, not {mine.uri()}")
    if header.get("owner"):
        _check_signature(blob, sig, header["owner"], header.get("owner_cert", ""), me.ca)
    key = serialization.load_pem_private_key(Path(me.key).read_bytes(), password=None)
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, eph_pub)
        payload = AESGCM(_key(key.exchange(ec.ECDH(), peer), head)).decrypt(nonce, body, MAGIC + head)
    except (InvalidTag, ValueError) as exc:
        raise ProtocolError("share file failed its integrity check (tampered, or not for this key)") from exc
    return header, payload


def _check_signature(blob: bytes, sig: bytes, owner_uri: str, owner_cert_pem: str, ca_path: Path) -> None:
    """The owner's certificate (in the header) must be signed by the CA, name the owner, and sign the file."""
    try:
        cert = x509.load_pem_x509_certificate(owner_cert_pem.encode())
        ca = _load_cert(ca_path)
        cert.verify_directly_issued_by(ca)
        ident = cert_identity(owner_cert_pem.encode())
        if ident is None or ident.uri() != owner_uri:
            raise ValueError("owner certificate names another identity")
        cert.public_key().verify(sig, blob, ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProtocolError(f"share file signature of {owner_uri} does not verify: {exc}") from None


def _payload(shares: dict[str, torch.Tensor]) -> tuple[list[dict], bytes]:
    specs, parts = [], []
    for name, t in shares.items():
        specs.append({"name": name, "shape": list(t.shape)})
        parts.append(t.contiguous().numpy().tobytes())
    return specs, b"".join(parts)


def _unpayload(specs: list[dict], payload: bytes) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for spec in specs:
        shape = tuple(int(d) for d in spec["shape"])
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
                 owner: TLSFiles | None = None, frac_bits: int = ring.DEFAULT_FRAC_BITS) -> list[Path]:
    """Split ``tensors`` for the parties whose certificates are given (in rank order) and write
    one encrypted file per party, ``<name>.party<r>.vshare``; signed if ``owner`` is given."""
    n = len(party_certs)
    if n < 2:
        raise ProtocolError("at least 2 computing parties are needed")
    for r, cert in enumerate(party_certs):
        if _identity_of(cert) != identity_for(r, n + 1):
            raise ProtocolError(f"{cert} is not the certificate of party {r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = os.urandom(16).hex()
    owner_ident = _identity_of(owner.cert) if owner is not None else None
    paths = []
    for r, (cert, shares) in enumerate(zip(party_certs, split(tensors, n, frac_bits), strict=True)):
        specs, payload = _payload(shares)
        header = {"format": "veil.mpc.sharefile/1", "dataset": dataset, "name": name, "party": r, "parties": n,
                  "frac_bits": frac_bits, "tensors": specs, "recipient": _identity_of(cert).uri(),
                  "owner": owner_ident.uri() if owner_ident else None,
                  "owner_cert": Path(owner.cert).read_text() if owner is not None else None}
        path = out_dir / f"{name}.party{r}{SUFFIX}"
        path.write_bytes(_seal(header, payload, cert, owner))
        paths.append(path)
    return paths


def read_shares(path: Path | str, me: TLSFiles, require_owner: str | None = None) -> dict[str, MPCTensor]:
    """This party's shares from its file (the runtime's rank and frac_bits must match the file's).

    ``require_owner`` (an owner name) refuses files not signed by that owner."""
    rt = P.current()
    header, payload = _open(Path(path).read_bytes(), me)
    if require_owner is not None and header.get("owner") != Identity("owner", require_owner).uri():
        raise ProtocolError(f"{path} is not signed by owner {require_owner}")
    if header.get("party") != rt.rank or header.get("parties") != rt.n or header.get("frac_bits") != rt.frac_bits:
        raise ProtocolError(f"{path} holds party {header.get('party')}'s shares of a {header.get('parties')}-party "
                            f"split; this is party {rt.rank} of {rt.n}")
    check_same_dataset(header)
    return {k: MPCTensor(v) for k, v in _unpayload(header["tensors"], payload).items()}


def check_same_dataset(header: dict) -> None:
    """Every party checks that all parties loaded shares of the same split (one round)."""
    rt = P.current()
    digest = hashlib.sha256(json.dumps([header["dataset"], header["name"], header["tensors"]]).encode()).digest()
    mine = torch.frombuffer(bytearray(digest), dtype=torch.int64).clone()
    if any(not torch.equal(mine, other) for other in rt.comm.exchange(mine)):
        raise ProtocolError(f"the parties loaded different share files for {header['name']!r}")


def write_result(tensors: dict[str, MPCTensor], holder_cert: Path | str, out_dir: Path | str, name: str,
                 me: TLSFiles) -> Path:
    """This party's shares of results, encrypted to the holder (an owner outside the parties)."""
    rt = P.current()
    holder = _identity_of(holder_cert)
    specs, payload = _payload({k: v._share.detach() for k, v in tensors.items()})
    header = {"format": "veil.mpc.sharefile/1", "dataset": name, "name": name, "party": rt.rank, "parties": rt.n,
              "frac_bits": rt.frac_bits, "tensors": specs, "recipient": holder.uri(),
              "owner": _identity_of(me.cert).uri(), "owner_cert": Path(me.cert).read_text()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.party{rt.rank}{SUFFIX}"
    path.write_bytes(_seal(header, payload, holder_cert, me))
    return path


def read_result(paths: list[Path | str], me: TLSFiles) -> dict[str, torch.Tensor]:
    """The holder adds the parties' shares: every party's file (signed by that party) is needed."""
    parts = []
    for p in paths:
        header, payload = _open(Path(p).read_bytes(), me)
        parts.append((header, _unpayload(header["tensors"], payload)))
    if not parts:
        raise ProtocolError("no result files")
    n = parts[0][0]["parties"]
    ranks = sorted(h["party"] for h, _ in parts)
    if ranks != list(range(n)) or any(h["name"] != parts[0][0]["name"] or h["owner"] != identity_for(
            h["party"], n + 1).uri() for h, _ in parts):
        raise ProtocolError(f"need one result file signed by each of the {n} parties, got parties {ranks}")
    out = {}
    for spec in parts[0][0]["tensors"]:
        total = sum(s[spec["name"]] for _, s in parts)
        out[spec["name"]] = ring.decode(total, parts[0][0]["frac_bits"])
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
        """This party's shares of dataset or model ``name`` (checked to be the same split everywhere)."""
        return read_shares(self.shares_dir / f"{name}.party{self.rank}{SUFFIX}", self.me, require_owner=owner)

    def load_module(self, module, name: str, owner: str | None = None):
        """``module`` (the same architecture as the owner's) with its parameters and floating
        buffers replaced by this party's shares of model ``name``."""
        from torch import nn

        tensors = self.load(name, owner)
        state = module.state_dict()
        if set(tensors) != {k for k, v in state.items() if v.is_floating_point()}:
            raise ProtocolError(f"model {name!r} holds {sorted(tensors)}, the module expects {sorted(state)}")
        for key, t in tensors.items():
            if tuple(t.shape) != tuple(state[key].shape):
                raise ProtocolError(f"model {name!r}: {key} has shape {tuple(t.shape)}, "
                                    f"expected {tuple(state[key].shape)}")
            mod_name, _, attr = key.rpartition(".")
            mod = module.get_submodule(mod_name) if mod_name else module
            if attr in mod._parameters:
                setattr(mod, attr, nn.Parameter(t, requires_grad=mod._parameters[attr].requires_grad))
            else:
                mod._buffers[attr] = t
        return module

    def reveal(self, tensors: dict[str, MPCTensor], name: str = "result") -> Path:
        """Write this party's shares of ``tensors`` encrypted to the holder."""
        if self.holder_cert is None:
            raise ProtocolError("no --holder given: results cannot be revealed to anyone")
        return write_result(tensors, self.holder_cert, self.out_dir, name, self.me)
