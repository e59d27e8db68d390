"""The operator's attestation policy: which platforms, roots, measurements and TCB levels are trusted.

A policy file is TOML (or JSON with the same structure), checked strictly: unknown keys, wrong
types, malformed hex, empty measurement lists and missing roots are `PolicyFileError`, never
ignored. Root files are read when the policy loads, relative to the policy file. Example::

    version = 1

    [platforms.sev-snp]
    roots = ["amd/milan_cert_chain.pem"]          # ASK + ARK as AMD publishes them
    measurements = ["7a1e5c26...48 bytes hex"]     # at least one; evidence must match one
    min_svn = 1                                    # GUEST_SVN
    min_tcb = { boot_loader = 3, snp = 8, microcode = 115 }
    max_vmpl = 0
    allow_debug = false                            # the default: a debuggable guest is refused

    [platforms.sgx]
    roots = ["intel/sgx_root_ca.pem"]
    measurements = ["<MRENCLAVE>"]
    signers = ["<MRSIGNER>"]
    product_ids = [0]
    tcb_status = ["UpToDate", "SWHardeningNeeded"] # default ["UpToDate"]

    [platforms.nitro]
    roots = ["aws/nitro_root_g1.pem"]
    measurements = ["<PCR0>"]
    registers = { pcr1 = ["<PCR1>"], pcr2 = ["<PCR2>"] }

Evaluation (`Policy.check`), first failure raised: platform allowed, root among the policy's, debug,
measurement, signer, product id, SVN, each minimum TCB component, TCB status, named registers, VMPL.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives.serialization import Encoding

from veil.tee._x509 import load_certificates
from veil.tee.claims import Claims, Evidence, Verifier
from veil.tee.dcap import DcapVerifier
from veil.tee.errors import DebugError, MeasurementError, PlatformError, PolicyError, PolicyFileError, TcbError
from veil.tee.nitro import NitroVerifier
from veil.tee.sevsnp import SevSnpVerifier

VerifierFactory = Callable[[Sequence[bytes]], Verifier]

BUILTIN_VERIFIERS: Mapping[str, VerifierFactory] = MappingProxyType({
    "sev-snp": SevSnpVerifier,
    "sgx": lambda roots: DcapVerifier(roots, "sgx"),
    "tdx": lambda roots: DcapVerifier(roots, "tdx"),
    "nitro": NitroVerifier,
})
MEASUREMENT_BYTES = MappingProxyType({"sev-snp": 48, "sgx": 32, "tdx": 48, "nitro": 48})
TCB_COMPONENTS = MappingProxyType({
    "sev-snp": frozenset({"boot_loader", "tee", "snp", "microcode", "fmc"}),
    "sgx": frozenset({"isv_svn", "qe_svn", "pce_svn"}),
    "tdx": frozenset({"qe_svn", "pce_svn", "tdx_module_minor", "tdx_module_major"}),
    "nitro": frozenset(),
})
TCB_STATUSES = frozenset({"UpToDate", "SWHardeningNeeded", "ConfigurationNeeded",
                          "ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"})
DCAP_PLATFORMS = frozenset({"sgx", "tdx"})
PLATFORM_KEYS = frozenset({"roots", "measurements", "signers", "product_ids", "min_svn", "min_tcb", "tcb_status",
                           "allow_debug", "registers", "max_vmpl"})
MAX_POLICY_BYTES = 1 << 20


@dataclass(frozen=True)
class PlatformPolicy:
    """What one platform's evidence must show to be trusted."""

    platform: str
    roots: tuple[bytes, ...]
    measurements: frozenset[bytes]
    signers: frozenset[bytes] | None = None
    product_ids: frozenset[int] | None = None
    min_svn: int | None = None
    min_tcb: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    tcb_status: frozenset[str] = frozenset({"UpToDate"})
    allow_debug: bool = False
    registers: Mapping[str, frozenset[bytes]] = field(default_factory=lambda: MappingProxyType({}))
    max_vmpl: int | None = None

    @cached_property
    def root_fingerprints(self) -> frozenset[str]:
        return frozenset(hashlib.sha256(c.public_bytes(Encoding.DER)).hexdigest()
                         for data in self.roots for c in load_certificates(data, "root", PolicyFileError))

    def check(self, claims: Claims) -> None:
        """Raise the `PolicyError` subclass naming the first requirement `claims` miss."""
        if claims.platform != self.platform:
            raise PlatformError(f"{claims.platform} claims checked against the {self.platform} policy")
        if claims.root_sha256 not in self.root_fingerprints:
            raise PolicyError(f"evidence chains to root {claims.root_sha256[:16]}..., not one the policy names")
        if claims.debug and not self.allow_debug:
            raise DebugError(f"{self.platform} evidence comes from a debuggable enclave or guest; the policy "
                             "refuses debug (allow_debug = false)")
        if claims.measurement not in self.measurements:
            raise MeasurementError(f"{self.platform} measurement {claims.measurement.hex()} is not in the policy")
        if self.signers is not None and claims.signer not in self.signers:
            raise MeasurementError(f"{self.platform} signer {(claims.signer or b'').hex()} is not in the policy")
        if self.product_ids is not None and claims.product_id not in self.product_ids:
            raise MeasurementError(f"{self.platform} product id {claims.product_id} is not in the policy")
        if self.min_svn is not None and (claims.svn is None or claims.svn < self.min_svn):
            raise TcbError(f"{self.platform} SVN {claims.svn} is below the policy's minimum {self.min_svn}")
        for name, minimum in self.min_tcb.items():
            value = claims.tcb.get(name)
            if value is None or value < minimum:
                raise TcbError(f"{self.platform} TCB {name}={value} is below the policy's minimum {minimum}")
        if claims.tcb_status is not None and claims.tcb_status not in self.tcb_status:
            raise TcbError(f"{self.platform} TCB status {claims.tcb_status} is not one of {sorted(self.tcb_status)}")
        for name, allowed in self.registers.items():
            if claims.registers.get(name) not in allowed:
                value = claims.registers.get(name)
                raise MeasurementError(f"{self.platform} register {name}="
                                       f"{value.hex() if value is not None else None} is not in the policy")
        if self.max_vmpl is not None:
            vmpl = claims.details.get("vmpl")
            if not isinstance(vmpl, int) or vmpl > self.max_vmpl:
                raise PolicyError(f"SEV-SNP VMPL {vmpl} is above the policy's maximum {self.max_vmpl}")


@dataclass(frozen=True)
class Policy:
    """Per-platform requirements plus the verifiers built from the policy's own roots."""

    platforms: Mapping[str, PlatformPolicy]
    verifiers: Mapping[str, Verifier]

    def verify(self, evidence: Evidence, *, at: datetime | None = None) -> Claims:
        """Verify `evidence` with its platform's verifier, then check the claims; returns them if trusted."""
        if evidence.platform not in self.platforms:
            raise PlatformError(f"platform {evidence.platform!r} is not allowed (policy allows "
                                f"{sorted(self.platforms)})")
        claims = self.verifiers[evidence.platform].verify(evidence, at=at)
        self.check(claims)
        return claims

    def check(self, claims: Claims) -> None:
        if claims.platform not in self.platforms:
            raise PlatformError(f"platform {claims.platform!r} is not allowed")
        self.platforms[claims.platform].check(claims)


def load_policy(path: str | Path, plugins: Mapping[str, VerifierFactory] | None = None) -> Policy:
    """Read a TOML (``.toml``) or JSON (``.json``) policy file; roots are resolved relative to it.

    `plugins` adds verifiers for further platforms (name -> factory taking the root files' bytes);
    the built-in ones cannot be replaced.
    """
    path = Path(path)
    raw = _read_file(path, "policy")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PolicyFileError(f"policy {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: "
                              f"{exc}") from None
    return parse_policy(data, base_dir=path.parent, plugins=plugins)


def parse_policy(data: object, *, base_dir: str | Path, plugins: Mapping[str, VerifierFactory] | None = None
                 ) -> Policy:
    """Build a `Policy` from already-decoded TOML/JSON data (see the module docstring for the format)."""
    plugins = dict(plugins or {})
    if clash := set(plugins) & set(BUILTIN_VERIFIERS):
        raise PolicyFileError(f"plug-ins cannot replace the built-in verifiers {sorted(clash)}")
    factories = {**BUILTIN_VERIFIERS, **plugins}
    if not isinstance(data, dict) or set(data) != {"version", "platforms"}:
        raise PolicyFileError("a policy has exactly the keys 'version' and 'platforms'")
    if data["version"] != 1 or isinstance(data["version"], bool):
        raise PolicyFileError(f"policy version {data['version']!r} is not 1")
    platforms = data["platforms"]
    if not isinstance(platforms, dict) or not platforms:
        raise PolicyFileError("policy 'platforms' must be a non-empty table")
    parsed: dict[str, PlatformPolicy] = {}
    verifiers: dict[str, Verifier] = {}
    for name, table in platforms.items():
        if name not in factories:
            raise PolicyFileError(f"unknown platform {name!r} (known: {sorted(factories)})")
        parsed[name] = _platform(name, table, Path(base_dir))
        verifiers[name] = factories[name](parsed[name].roots)
    return Policy(platforms=MappingProxyType(parsed), verifiers=MappingProxyType(verifiers))


def _platform(name: str, table: object, base_dir: Path) -> PlatformPolicy:
    where = f"platforms.{name}"
    if not isinstance(table, dict):
        raise PolicyFileError(f"{where} must be a table")
    if unknown := set(table) - PLATFORM_KEYS:
        raise PolicyFileError(f"{where} has unknown keys {sorted(unknown)}")
    if "roots" not in table or "measurements" not in table:
        raise PolicyFileError(f"{where} needs 'roots' and 'measurements'")
    if "tcb_status" in table and name not in DCAP_PLATFORMS:
        raise PolicyFileError(f"{where}.tcb_status applies only to sgx and tdx")
    if "max_vmpl" in table and name != "sev-snp":
        raise PolicyFileError(f"{where}.max_vmpl applies only to sev-snp")
    size = MEASUREMENT_BYTES.get(name)
    roots = tuple(_root(base_dir, p, f"{where}.roots") for p in _list(table["roots"], f"{where}.roots", str))
    measurements = _hex_set(table["measurements"], f"{where}.measurements", size)
    signers = _hex_set(table["signers"], f"{where}.signers", None) if "signers" in table else None
    product_ids = frozenset(_int(v, f"{where}.product_ids") for v in
                            _list(table["product_ids"], f"{where}.product_ids", int)) \
        if "product_ids" in table else None
    min_tcb = table.get("min_tcb", {})
    if not isinstance(min_tcb, dict):
        raise PolicyFileError(f"{where}.min_tcb must be a table of component = minimum")
    known = TCB_COMPONENTS.get(name)
    for component, value in min_tcb.items():
        if known is not None and component not in known:
            raise PolicyFileError(f"{where}.min_tcb.{component} is not a TCB component of {name} "
                                  f"({sorted(known)})")
        _int(value, f"{where}.min_tcb.{component}")
    statuses = frozenset(_list(table.get("tcb_status", ["UpToDate"]), f"{where}.tcb_status", str))
    if bad := statuses - TCB_STATUSES:
        raise PolicyFileError(f"{where}.tcb_status has unknown statuses {sorted(bad)} (known: {sorted(TCB_STATUSES)})")
    allow_debug = table.get("allow_debug", False)
    if not isinstance(allow_debug, bool):
        raise PolicyFileError(f"{where}.allow_debug must be true or false")
    registers = table.get("registers", {})
    if not isinstance(registers, dict):
        raise PolicyFileError(f"{where}.registers must be a table of name = [hex, ...]")
    return PlatformPolicy(
        platform=name, roots=roots, measurements=measurements, signers=signers, product_ids=product_ids,
        min_svn=_int(table["min_svn"], f"{where}.min_svn") if "min_svn" in table else None,
        min_tcb=MappingProxyType(dict(min_tcb)), tcb_status=statuses, allow_debug=allow_debug,
        registers=MappingProxyType({str(k): _hex_set(v, f"{where}.registers.{k}", None)
                                    for k, v in registers.items()}),
        max_vmpl=_int(table["max_vmpl"], f"{where}.max_vmpl", 3) if "max_vmpl" in table else None)


def _list(value: object, where: str, kind: type) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                           for v in value):
        raise PolicyFileError(f"{where} must be a non-empty list of {kind.__name__}")
    return value


def _int(value: object, where: str, maximum: int = (1 << 32) - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise PolicyFileError(f"{where} must be an integer in 0..{maximum}")
    return value


def _hex_set(value: object, where: str, size: int | None) -> frozenset[bytes]:
    out = set()
    for text in _list(value, where, str):
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise PolicyFileError(f"{where}: {text!r} is not hex") from None
        if (size is not None and len(raw) != size) or not 0 < len(raw) <= 64:
            raise PolicyFileError(f"{where}: {text!r} is {len(raw)} bytes, expected {size or '1..64'}")
        out.add(raw)
    return frozenset(out)


def _read_file(path: Path, where: str) -> bytes:
    """The bytes of a regular file of at most MAX_POLICY_BYTES (a FIFO or device would block or
    never end), else PolicyFileError naming `where`."""
    try:
        if not path.is_file():
            raise PolicyFileError(f"{where}: cannot read {path}: not a regular file")
        with path.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise PolicyFileError(f"{where}: cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyFileError(f"{where}: {path} is larger than {MAX_POLICY_BYTES} bytes")
    return data


def _root(base_dir: Path, name: str, where: str) -> bytes:
    data = _read_file(base_dir / name, where)
    load_certificates(data, f"{where} {name}", PolicyFileError)
    return data



