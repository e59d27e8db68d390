"""Trusted execution: verify attestation evidence, decide by policy, release the model key to enclaves.

- `Evidence` -> verifier -> `Claims`: `SevSnpVerifier` (AMD SEV-SNP reports, `cryptography`),
  `DcapVerifier` (Intel SGX/TDX DCAP quotes, `dcap-qvl`), `NitroVerifier` (AWS Nitro documents,
  `cbor2` + `cryptography`); every failure is an `AttestationError` subclass naming the failed leg.
- `load_policy`: the operator's strict policy file (platforms, roots, measurements, TCB, debug).
- `KeyBroker` / `KeyRequester`: the nonce-bound key-release protocol (`veil.tee.keyrelease`).
- `veil.tee.providers`: evidence from Gramine, the TSM configfs, /dev/sev-guest and the Nitro NSM.
- `veil.tee.manifest`: a Gramine manifest and a Nitro enclave image for `veil worker`.
"""

from veil.tee.binding import check_binding, key_release_report_data, tls_report_data
from veil.tee.claims import Claims, Evidence, Verifier
from veil.tee.dcap import Collateral, DcapVerifier
from veil.tee.errors import (
                             AttestationError,
                             BindingError,
                             ChainError,
                             CollateralError,
                             DebugError,
                             DeviceError,
                             EvidenceFormatError,
                             ExpiredError,
                             KeyReleaseError,
                             MeasurementError,
                             NoEvidenceError,
                             NonceError,
                             PlatformError,
                             PolicyError,
                             PolicyFileError,
                             RevokedError,
                             SignatureError,
                             TcbError,
                             UnsupportedEvidenceError,
)
from veil.tee.keyrelease import Challenge, KeyBroker, KeyGrant, KeyRequest, KeyRequester, RefusalCounter
from veil.tee.nitro import NitroVerifier
from veil.tee.policy import PlatformPolicy, Policy, load_policy, parse_policy
from veil.tee.sevsnp import SevSnpVerifier

__all__ = [
    "AttestationError", "BindingError", "ChainError", "Challenge", "Claims", "Collateral", "CollateralError",
    "DcapVerifier", "DebugError", "DeviceError", "Evidence", "EvidenceFormatError", "ExpiredError", "KeyBroker",
    "KeyGrant", "KeyReleaseError", "KeyRequest", "KeyRequester", "MeasurementError", "NitroVerifier",
    "NoEvidenceError", "NonceError", "PlatformError", "PlatformPolicy", "Policy", "PolicyError", "PolicyFileError",
    "RefusalCounter", "RevokedError", "SevSnpVerifier", "SignatureError", "TcbError", "UnsupportedEvidenceError",
    "Verifier", "check_binding", "key_release_report_data", "load_policy", "parse_policy", "tls_report_data",
]
