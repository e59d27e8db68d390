"""Real recorded evidence, read at test time from ../shared/tee-vectors (or $VEIL_TEE_VECTORS).

None of these files is copied into the repository (several come from AGPL-3.0 or BUSL-1.1 projects);
SOURCES.md in that folder gives each file's provenance, licence and certificate dates. The
"recorded" times below are the dates the evidence was committed to its source repository (inside
every certificate's validity), or the validity window of its collateral.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from veil.tee import Collateral, Evidence
from veil.tee.dcap import parse_quote_frame

REPO = Path(__file__).resolve().parents[2]
VECTORS = Path(os.environ.get("VEIL_TEE_VECTORS") or REPO.parent / "shared" / "tee-vectors")
REAL_NOW = datetime(2026, 12, 7, tzinfo=UTC)


def vectors() -> Path:
    if not (VECTORS / "SOURCES.md").is_file():
        pytest.skip(f"recorded TEE evidence not found at {VECTORS}: set VEIL_TEE_VECTORS or put shared/tee-vectors "
                    "beside the repository")
    return VECTORS


def read(relative: str) -> bytes:
    return (vectors() / relative).read_bytes()


def at(day: str) -> datetime:
    """A recorded time: 'YYYY-MM-DD' means noon UTC that day."""
    return datetime.fromisoformat(day if "T" in day else day + "T12:00:00").replace(tzinfo=UTC)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


# SEV-SNP: report, endorsement cert, key kind, roots file, recorded day, measurement prefix, debug
SNP_CASES = {
    "virtee-milan": ("virtee-sev_report_milan.bin", "virtee-sev_vcek_milan.der", "vcek", "milan", "2023-05-02",
                     "7a1e5c26", False),
    "go-sev-guest-debug": ("go-sev-guest_attestation.bin", "go-sev-guest_vcek.der", "vcek", "milan", "2022-09-24",
                           "b07af962", True),
    "trustee": ("trustee_test-report.bin", "trustee_test-vcek.der", "vcek", "milan", "2024-07-03", "a1f39304", False),
    "trustee-vlek": ("trustee_test-vlek-report.bin", "trustee_test-vlek.der", "vlek", "milan_vlek", "2025-05-28",
                     None, False),
    "azure-milan": ("trustee-azure_milan_snp-report.bin", "trustee-azure_milan_vcek-chain.pem", "vcek", "milan",
                    "2024-07-03", None, False),
    "azure-genoa": ("trustee-azure_genoa_snp-report.bin", "trustee-azure_genoa_vcek.pem", "vcek", "genoa",
                    "2026-02-20", None, False),
    "oak-genoa-v5": ("oak_genoa_oc_report.bin", "oak_genoa_oc_vcek.der", "vcek", "genoa", "2025-08-08", None, False),
    "oak-turin-v5": ("oak_turin_oc_report.bin", "oak_turin_oc_vcek.der", "vcek", "turin_vcek", "2025-07-21", None,
                     False),
    "oak-milan-release": ("oak_milan_oc_release_report.bin", "oak_milan_oc_release_vcek.der", "vcek", "milan",
                          "2025-07-29", "195b01b7", False),
    "oak-milan-staging": ("oak_milan_oc_staging_report.bin", "oak_milan_oc_staging_vcek.der", "vcek", "milan",
                          "2025-07-29", "0a3c0fa3", False),
    "oak-milan-rk": ("oak_milan_rk_release_report.bin", "oak_milan_rk_release_vcek.der", "vcek", "milan",
                     "2025-07-29", "195b01b7", False),
    "oak-cb": ("oak_cb_report.bin", "oak_cb_vcek.der", "vcek", "milan", "2025-04-21", "7f758c86", False),
    "constellation-azure": ("constellation_azure_snp-report.bin", "constellation_azure_vcek.der", "vcek", "milan",
                            "2023-11-24", None, False),
    "constellation-aws-vlek": ("constellation_aws_report.bin", "constellation_aws_vlek.pem", "vlek", "milan_vlek",
                               "2025-05-06", None, False),
    "ms-aci": ("ms-aci-sidecar_snp_report.bin", "ms-aci-sidecar_vcek-chain.pem", "vcek", "milan", "2023-02-13", None,
               False),
    "signal-sev": ("signal-svr2_sev_report.bin", "signal-svr2_sev_vcek.der", "vcek", "milan", "2023-06-14",
                   "16a477d1", False),
    "signal-azure": ("signal-svr2_tpm2snp_azure_snp-report.bin", "signal-svr2_tpm2snp_vcek.der", "vcek", "milan",
                     "2024-02-02", None, False),
    "teekit-gcp-v5": ("teekit_sev-gcp.bin", "teekit_sev-gcp-vcek.pem", "vcek", "milan", "2025-12-06", None, False),
    "teekit-gcp-reportdata": ("teekit_sev-gcp-reportdata.bin", "teekit_sev-gcp-vcek.pem", "vcek", "milan",
                              "2025-12-06", None, False),
    "teekit-gcp-x25519": ("teekit_sev-gcp-x25519-bound.bin", "teekit_sev-gcp-x25519-vcek.pem", "vcek", "milan",
                          "2025-12-06", None, False),
    "routex-genoa-v5": ("routex_genoa_v5_report.bin", "routex_vcek-chain-genoa-v5.pem", "vcek", "genoa",
                        "2026-03-06", None, False),
    "routex-genoa-v3": ("routex_genoa_v3_report.bin", "routex_vcek-chain-genoa.pem", "vcek", "genoa", "2026-03-06",
                        None, False),
}
SNP_ROOTS = ("milan", "milan_vlek", "genoa", "genoa_vlek", "turin_vcek", "turin_vlek")


def snp_root(name: str) -> bytes:
    return read(f"sev-snp/roots/amd_ask_ark_{name}.pem")


def snp_evidence(case: str, report: bytes | None = None) -> Evidence:
    report_file, cert, key, _, _, _, _ = SNP_CASES[case]
    return Evidence("sev-snp", read(f"sev-snp/{report_file}") if report is None else report,
                    {key: read(f"sev-snp/{cert}")})


# SGX/TDX: quote, platform, TCB info, QE identity, PCK CRL, recorded time, TCB status, debug
SGX_WINDOW = "2025-08-15T06:00:00"
TDX_WINDOW = "2025-10-28T07:00:00"
_SGX_COLL = ("automata-collateral/0825_sgx_tcbinfov3_00606a000000.json",
             "automata-collateral/0825_sgx_qeidentity_v4.json", "automata-collateral/0825_platform_crl.der", SGX_WINDOW)
_TDX_COLL = ("automata-collateral/1025_tcb_info.json", "trustee_enclaveIdentity.json",
             "automata-collateral/1025_pck_crl.der", TDX_WINDOW)
DCAP_CASES = {
    "automata-sgx-v3": ("automata_sgx_quotev3.bin", "sgx", *_SGX_COLL, "SWHardeningNeeded"),
    "godcap-sgx-v3": ("automata_godcap_sgx_quote_v3.bin", "sgx", *_SGX_COLL, "SWHardeningNeeded"),
    "automata-tdx-v4": ("automata_tdx_quotev4.bin", "tdx", *_TDX_COLL, "OutOfDate"),
    "gcp-cos-tdx-v4": ("go-tdx-guest_cos-113-tdx-quote.dat", "tdx", *_TDX_COLL, "UpToDate"),
    "oak-tdx-v4": ("oak_tdx_oc_quote.bin", "tdx", *_TDX_COLL, "UpToDate"),
    "edgeless-tdx-v4": ("teekit_tdx-v4-edgeless.dat", "tdx", *_TDX_COLL, "OutOfDate"),
    "gcp-tdx-v4": ("teekit_tdx-v4-gcp.quote.bin", "tdx", *_TDX_COLL, "UpToDate"),
    "gcp-tdx-no-nonce": ("teekit_tdx-v4-gcp-no-nonce.quote.bin", "tdx", *_TDX_COLL, "UpToDate"),
    "phala-tdx-v4": ("teekit_tdx-v4-phala.dat", "tdx", "teekit-collateral/tcbInfo-tdx-b0c06f000000.json",
                     *_TDX_COLL[1:], "UpToDate"),
    "trustee-tdx-v4": ("trustee_tdx_quote_6.dat", "tdx", "trustee_tcbInfo.json", *_TDX_COLL[1:], "OutOfDate"),
}
ROOT_CA_CRL = "automata-collateral/solana_intel_root_ca_crl.der"


def intel_root() -> bytes:
    return read("sgx-tdx/intel_sgx_root_ca.pem")


def tcb_signing_chain() -> bytes:
    """Intel SGX TCB Signing certificate (valid 2025-05-06 to 2032) and the Intel root, as PEM."""
    return b"".join(x509.load_der_x509_certificate(read(f"sgx-tdx/automata-collateral/{name}")).public_bytes(
        Encoding.PEM) for name in ("solana_signing.der", "solana_root.der"))


def tcb_signing_chain_2018() -> bytes:
    """The earlier TCB Signing certificate (2018 to 2033), for collateral issued before May 2025."""
    return "".join(json.loads(read("sgx-tdx/fortanix-collateral/00906ea10000.tcb"))["ca_chain"]).encode()


def collateral(quote: bytes, tcb_info: str, qe_identity: str, pck_crl: str, root_crl: str = ROOT_CA_CRL,
               signing: bytes | None = None) -> bytes:
    chain = x509.load_pem_x509_certificates(parse_quote_frame(quote).pck_chain_pem.rstrip(b"\0"))
    return Collateral.from_pcs(
        tcb_info=read(f"sgx-tdx/{tcb_info}"), qe_identity=read(f"sgx-tdx/{qe_identity}"),
        tcb_signing_chain=signing or tcb_signing_chain(), pck_crl=read(f"sgx-tdx/{pck_crl}"),
        pck_crl_chain=b"".join(c.public_bytes(Encoding.PEM) for c in chain[1:]),
        root_ca_crl=read(f"sgx-tdx/{root_crl}")).to_json()


def dcap_evidence(case: str, quote: bytes | None = None) -> tuple[Evidence, datetime]:
    quote_file, platform, tcb_info, qe_identity, pck_crl, when, _ = DCAP_CASES[case]
    original = read(f"sgx-tdx/{quote_file}")
    coll = collateral(original, tcb_info, qe_identity, pck_crl)
    return Evidence(platform, original if quote is None else quote, {"collateral": coll}), at(when)


# Nitro: document, recorded ISO time (the document's own timestamp), PCR0 prefix, debug
NITRO_CASES = {
    "marlin-2024-12-13": ("marlin_aws_2024-12-13.cbor", "189038ec", False),
    "marlin-pcr16": ("marlin_aws_pcr16_2025-04-29.cbor", None, False),
    "marlin-2024-08-07a": ("marlin_verifier_2024-08-07a.cbor", "5fec1b73", False),
    "marlin-2024-08-07b": ("marlin_verifier_2024-08-07b.cbor", "5fec1b73", False),
    "signal-production": ("signal-svr2_valid_bytes2.cbor", "28de6557", False),
    "signal-debug": ("signal-svr2_valid_bytes_debug.cbor", "00000000", True),
    "fortanix-debug": ("fortanix_request_proper_debug.cbor", "00000000", True),
    "eternis-example-debug": ("eternis_example_attestation.cbor", "00000000", True),
    "eternis-libtest-debug": ("eternis_libtest.cbor", "00000000", True),
}


def nitro_root() -> bytes:
    return read("nitro/aws_nitro_root_g1.pem")


def write_policy(directory: Path, platforms: dict[str, dict], plugins=None):
    """Write a JSON policy whose ``roots`` entries are bytes (saved beside it) and load it."""
    from veil.tee import load_policy

    tables = {}
    for platform, table in platforms.items():
        table = dict(table)
        names = []
        for i, root in enumerate(table.pop("roots")):
            name = f"{platform}-root-{i}.pem"
            (directory / name).write_bytes(root)
            names.append(name)
        tables[platform] = {"roots": names, **table}
    path = directory / "policy.json"
    path.write_text(json.dumps({"version": 1, "platforms": tables}))
    return load_policy(path, plugins=plugins)
