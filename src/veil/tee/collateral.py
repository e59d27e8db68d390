"""Intel's SGX/TDX verification collateral, from a file the operator keeps current or from a PCCS.

A DCAP quote verifies only together with Intel's signed TCB info and QE identity and the PCK and
Root CA CRLs (`veil.tee.dcap.Collateral`). They expire within about 30 days, so whoever verifies or
presents a quote needs a current copy: `FileCollateral` reads a `Collateral` JSON file (re-read
when it changes), `PccsCollateral` fetches the four items from the operator's PCCS (or Intel's PCS)
with the Intel PCS v4 API:

1. ``GET {url}/{sgx|tdx}/certification/v4/tcb?fmspc=FMSPC``: TCB info; header
   ``TCB-Info-Issuer-Chain`` (``SGX-TCB-Info-Issuer-Chain`` in v3), the TCB Signing chain;
2. ``GET {url}/{sgx|tdx}/certification/v4/qe/identity``: the QE (or TD QE) identity;
3. ``GET {url}/sgx/certification/v4/pckcrl?ca=processor|platform&encoding=der``: the CRL of the
   quote's PCK CA; header ``SGX-PCK-CRL-Issuer-Chain``;
4. ``GET {url}/sgx/certification/v4/rootcacrl``: the Intel SGX Root CA's CRL (hex or DER).

The FMSPC and the CA come from the quote's own PCK certificate chain. Nothing fetched is trusted:
every item is signed by Intel and checked by `dcap-qvl` against the policy's root, so a PCCS can
only make verification fail, never pass. Answers are cached per (platform, FMSPC, CA) for
`cache_seconds`.
"""

from __future__ import annotations

import string
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, Self

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.tee.claims import Evidence
from veil.tee.dcap import Collateral, parse_quote_frame
from veil.tee.errors import CollateralError

DCAP_PLATFORMS = ("sgx", "tdx")
MAX_ITEM_BYTES = 1 << 20
DEFAULT_CACHE_SECONDS = 3600.0
HEXDIGITS = frozenset(string.hexdigits.encode())


class CollateralSource(Protocol):
    """Gives the collateral JSON (`Collateral.to_json`) that verifies one SGX/TDX quote; `close`
    releases what it holds (idempotent), and it is a context manager that closes on exit."""

    def collateral(self, evidence: Evidence) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc_info: object) -> None: ...


def with_collateral(evidence: Evidence, source: CollateralSource | None) -> Evidence:
    """`evidence` with its ``collateral`` endorsement from `source` (SGX/TDX only; others unchanged)."""
    if source is None or evidence.platform not in DCAP_PLATFORMS:
        return evidence
    endorsements = {**evidence.endorsements, "collateral": source.collateral(evidence)}
    return Evidence(evidence.platform, evidence.blob, endorsements)


class _Closing:
    """`with source:` closes the source on exit (`close` of the class it is mixed into)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FileCollateral(_Closing):
    """A `Collateral` JSON file, validated when read and read again whenever it changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._data = b""
        self._lock = threading.Lock()
        self.collateral(None)

    def collateral(self, evidence: Evidence | None) -> bytes:
        with self._lock:
            try:
                st = self.path.stat()
                if (st.st_mtime_ns, st.st_size) != self._stamp:
                    if st.st_size > MAX_ITEM_BYTES:
                        raise CollateralError(f"collateral file {self.path} is larger than {MAX_ITEM_BYTES} bytes")
                    data = self.path.read_bytes()
                    Collateral.from_json(data)
                    self._data, self._stamp = data, (st.st_mtime_ns, st.st_size)
            except OSError as exc:
                raise CollateralError(f"cannot read collateral file {self.path}: {exc.strerror}") from None
            return self._data

    def close(self) -> None:
        """Nothing to release: the file is opened only while it is read."""
        return None


def _crl_der(body: bytes, what: str) -> bytes:
    """A CRL as DER whether the server sent DER, PEM or hex of the DER (PCCS implementations differ)."""
    text = body.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(text).public_bytes(Encoding.DER)
        if text and set(text) <= HEXDIGITS:
            return bytes.fromhex(text.decode("ascii"))
        x509.load_der_x509_crl(body)
        return body
    except ValueError:
        raise CollateralError(f"PCCS {what} is not a CRL (DER, PEM or hex)") from None


class PccsCollateral(_Closing):
    """Collateral fetched from a PCCS or Intel PCS (see the module docstring), cached per FMSPC.

    Parameters
    ----------
    url : the service's base URL (e.g. ``https://pccs.internal:8081`` or Intel's
        ``https://api.trustedservices.intel.com``), without the ``/sgx/certification/v4`` part.
    verify : TLS verification for it: True, False or a CA bundle path.
    timeout : seconds per request.
    cache_seconds : how long one platform's answers are reused.
    """

    def __init__(self, url: str, *, verify: bool | str = True, timeout: float = 10.0,
                 cache_seconds: float = DEFAULT_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        import httpx

        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"PCCS URL must be http(s)://host[:port][/path], got {url!r}")
        self.url = url.rstrip("/")
        self._http = httpx.Client(verify=verify, timeout=timeout, follow_redirects=False)
        self._cache: dict[tuple[str, str, str], tuple[float, bytes]] = {}
        self._cache_seconds, self._clock = cache_seconds, clock
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the HTTP client and its pooled connections to the PCCS; closing again does nothing."""
        self._http.close()

    def collateral(self, evidence: Evidence) -> bytes:
        frame = parse_quote_frame(evidence.blob)
        chain = x509.load_pem_x509_certificates(frame.pck_chain_pem.rstrip(b"\0"))
        issuer = chain[0].issuer.rfc4514_string()
        ca = "processor" if "Processor CA" in issuer else "platform" if "Platform CA" in issuer else None
        if ca is None:
            raise CollateralError(f"the quote's PCK certificate is issued by {issuer!r}, not a PCK Processor or "
                                  "Platform CA")
        fmspc = dcap_qvl.parse_quote(frame.quote).fmspc()
        key = (frame.tee, str(fmspc).lower(), ca)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and self._clock() < cached[0]:
                return cached[1]
        data = self._fetch(frame.tee, key[1], ca, b"".join(c.public_bytes(Encoding.PEM) for c in chain[1:]))
        with self._lock:
            self._cache[key] = (self._clock() + self._cache_seconds, data)
        return data

    def _fetch(self, tee: str, fmspc: str, ca: str, pck_ca_chain: bytes) -> bytes:
        tcb, tcb_headers = self._get(f"/{tee}/certification/v4/tcb", {"fmspc": fmspc}, "TCB info")
        identity, _ = self._get(f"/{tee}/certification/v4/qe/identity", {}, "QE identity")
        pck_crl, crl_headers = self._get("/sgx/certification/v4/pckcrl", {"ca": ca, "encoding": "der"}, "PCK CRL")
        root_crl, _ = self._get("/sgx/certification/v4/rootcacrl", {}, "Root CA CRL")
        signing = tcb_headers.get("tcb-info-issuer-chain") or tcb_headers.get("sgx-tcb-info-issuer-chain")
        if not signing:
            raise CollateralError("PCCS TCB info answer has no TCB-Info-Issuer-Chain header")
        crl_chain = crl_headers.get("sgx-pck-crl-issuer-chain")
        return Collateral.from_pcs(
            tcb_info=tcb, qe_identity=identity, tcb_signing_chain=urllib.parse.unquote(signing).encode("ascii"),
            pck_crl=_crl_der(pck_crl, "PCK CRL"),
            pck_crl_chain=urllib.parse.unquote(crl_chain).encode("ascii") if crl_chain else pck_ca_chain,
            root_ca_crl=_crl_der(root_crl, "Root CA CRL")).to_json()

    def _get(self, path: str, params: dict[str, str], what: str) -> tuple[bytes, dict[str, str]]:
        import httpx

        try:
            with self._http.stream("GET", self.url + path, params=params) as response:
                if response.status_code != 200:
                    raise CollateralError(f"PCCS answered {response.status_code} for the {what} ({path})")
                body = b""
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ITEM_BYTES:
                        raise CollateralError(f"PCCS {what} is larger than {MAX_ITEM_BYTES} bytes")
                return body, {k.lower(): v for k, v in response.headers.items()}
        except httpx.HTTPError as exc:
            raise CollateralError(f"cannot fetch the {what} from the PCCS at {self.url}: {type(exc).__name__}") \
                from None
