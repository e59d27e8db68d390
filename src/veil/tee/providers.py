"""Evidence providers: ask the platform for evidence over 64 bytes of report data.

One small class per device, each raising `DeviceError` when its device is absent or fails:

- `GramineProvider`: Gramine's pseudo-files in an SGX enclave (``/dev/attestation``): write
  ``user_report_data``, read ``quote`` (an SGX DCAP quote when ``attestation_type`` is ``dcap``);
- `TsmProvider`: Linux's configfs TSM report interface (``/sys/kernel/config/tsm/report``, TDX and
  SEV-SNP guests): make an entry, write ``inblob``, read ``outblob`` between two reads of
  ``generation`` (equal, or another writer raced us), read ``provider`` and, for SNP, ``auxblob``
  (the host's certificate table, whose VCEK/VLEK becomes the endorsement), remove the entry;
- `SevGuestProvider`: the SNP_GET_REPORT ioctl of ``/dev/sev-guest``;
- `NitroNsmProvider`: the Nitro Secure Module's request ioctl on ``/dev/nsm`` (CBOR request
  ``{"Attestation": {user_data, nonce, public_key}}``, answer ``{"Attestation": {"document": ...}}``).

Collateral and endorsement keys that the device does not return (Intel's collateral, a VCEK from
AMD's key distribution service) are added to the `Evidence` by the caller.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import struct
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import cbor2

from veil.tee.claims import REPORT_DATA_BYTES, Evidence
from veil.tee.errors import DeviceError

Ioctl = Callable[[int, int, bytearray, bool], int]


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


SNP_GUEST_REQUEST_BYTES = 32
SNP_GET_REPORT = _iowr(ord("S"), 0x0, SNP_GUEST_REQUEST_BYTES)
SNP_REPORT_REQ_BYTES = 96
SNP_REPORT_RESP_BYTES = 4000
SNP_REPORT_BYTES = 1184
NSM_MESSAGE_BYTES = 32
NSM_IOCTL_REQUEST = _iowr(0x0A, 0x0, NSM_MESSAGE_BYTES)
NSM_RESPONSE_MAX = 0x3000
SNP_CERT_GUIDS = {uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
                  uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
                  uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
                  uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark"}
TSM_PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}


class EvidenceProvider(Protocol):
    """Something on the platform that turns 64 bytes of report data into `Evidence`."""

    platform: str

    def attest(self, report_data: bytes) -> Evidence:
        ...


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_BYTES:
        raise ValueError(f"report data must be exactly {REPORT_DATA_BYTES} bytes")
    return report_data


class GramineProvider:
    """SGX DCAP quotes from Gramine's ``/dev/attestation`` inside an enclave."""

    platform = "sgx"

    def __init__(self, root: str | Path = "/dev/attestation") -> None:
        self.root = Path(root)

    def attest(self, report_data: bytes) -> Evidence:
        _check_report_data(report_data)
        try:
            kind = (self.root / "attestation_type").read_text().strip()
        except OSError as exc:
            raise DeviceError(f"no Gramine attestation interface at {self.root} ({exc.strerror}): not running in "
                              "a Gramine SGX enclave with remote attestation") from None
        if kind != "dcap":
            raise DeviceError(f"Gramine attestation type is {kind!r}; the manifest must set "
                              "sgx.remote_attestation = \"dcap\"")
        try:
            (self.root / "user_report_data").write_bytes(report_data)
            quote = (self.root / "quote").read_bytes()
        except OSError as exc:
            raise DeviceError(f"Gramine refused the quote request: {exc.strerror}") from None
        if not quote:
            raise DeviceError("Gramine returned an empty quote")
        return Evidence(self.platform, quote)


def parse_snp_cert_table(table: bytes) -> dict[str, bytes]:
    """The SEV-SNP extended-report certificate table: (GUID, offset, length) entries up to an all-zero one."""
    out: dict[str, bytes] = {}
    for pos in range(0, len(table) - 23, 24):
        guid, offset, length = table[pos:pos + 16], *struct.unpack_from("<II", table, pos + 16)
        if not any(table[pos:pos + 24]):
            return out
        if offset + length > len(table) or length == 0:
            raise DeviceError("SNP certificate table entry points outside the table")
        name = SNP_CERT_GUIDS.get(uuid.UUID(bytes=guid))
        if name is not None:
            out[name] = table[offset:offset + length]
    raise DeviceError("SNP certificate table has no terminating entry")


class TsmProvider:
    """TDX quotes or SEV-SNP reports through the Linux configfs TSM report interface."""

    def __init__(self, root: str | Path = "/sys/kernel/config/tsm/report", platform: str | None = None) -> None:
        self.root = Path(root)
        self.platform = platform or ""

    def attest(self, report_data: bytes) -> Evidence:
        _check_report_data(report_data)
        if not self.root.is_dir():
            raise DeviceError(f"no TSM report interface at {self.root}: not a TDX or SEV-SNP guest with configfs-tsm")
        entry = self._create_entry()
        try:
            (entry / "inblob").write_bytes(report_data)
            before = self._generation(entry)
            blob = (entry / "outblob").read_bytes()
            if self._generation(entry) != before:
                raise DeviceError("TSM report entry was rewritten while reading it (concurrent writer)")
            provider = (entry / "provider").read_text().strip()
            aux = entry / "auxblob"
            auxblob = aux.read_bytes() if aux.exists() else b""
        except OSError as exc:
            raise DeviceError(f"TSM report failed: {exc.strerror or exc}") from None
        finally:
            self._remove_entry(entry)
        platform = TSM_PROVIDERS.get(provider)
        if platform is None:
            raise DeviceError(f"TSM provider {provider!r} is not one of {sorted(TSM_PROVIDERS)}")
        if self.platform and platform != self.platform:
            raise DeviceError(f"TSM provider is {platform}, expected {self.platform}")
        if not blob:
            raise DeviceError("TSM returned an empty report")
        endorsements = {k: v for k, v in parse_snp_cert_table(auxblob).items() if k in ("vcek", "vlek")} \
            if platform == "sev-snp" and auxblob else {}
        return Evidence(platform, blob, endorsements)

    def _create_entry(self) -> Path:
        """mkdir in configfs makes the kernel create the entry's attribute files."""
        entry = self.root / f"veil-{secrets.token_hex(8)}"
        try:
            entry.mkdir()
        except OSError as exc:
            raise DeviceError(f"cannot create a TSM report entry: {exc.strerror}") from None
        return entry

    def _remove_entry(self, entry: Path) -> None:
        """rmdir in configfs removes the entry with its attribute files."""
        try:
            entry.rmdir()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise DeviceError(f"cannot remove TSM report entry {entry}: {exc.strerror}") from None

    @staticmethod
    def _generation(entry: Path) -> int:
        text = (entry / "generation").read_text().strip()
        if not text.isdigit():
            raise DeviceError(f"TSM generation {text!r} is not a number")
        return int(text)


def _call(device: str | Path, ioctl: Ioctl, request: int, arg: bytearray) -> None:
    try:
        fd = os.open(device, os.O_RDWR)
    except OSError as exc:
        raise DeviceError(f"cannot open {device} ({exc.strerror}): not on this platform or no permission") from None
    try:
        ioctl(fd, request, arg, True)
    except OSError as exc:
        raise DeviceError(f"{device} request failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


class SevGuestProvider:
    """SEV-SNP reports from ``/dev/sev-guest`` (SNP_GET_REPORT); the VCEK comes as `endorsements`."""

    platform = "sev-snp"

    def __init__(self, device: str | Path = "/dev/sev-guest", *, vmpl: int = 0,
                 endorsements: Mapping[str, bytes] | None = None, ioctl: Ioctl = fcntl.ioctl) -> None:
        if not 0 <= vmpl <= 3:
            raise ValueError("vmpl must be 0..3")
        self.device, self.vmpl, self.endorsements, self._ioctl = device, vmpl, dict(endorsements or {}), ioctl

    def attest(self, report_data: bytes) -> Evidence:
        _check_report_data(report_data)
        req = ctypes.create_string_buffer(report_data + struct.pack("<I", self.vmpl) + bytes(28),
                                          SNP_REPORT_REQ_BYTES)
        resp = ctypes.create_string_buffer(SNP_REPORT_RESP_BYTES)
        arg = bytearray(struct.pack("<B7xQQQ", 1, ctypes.addressof(req), ctypes.addressof(resp), 0))
        _call(self.device, self._ioctl, SNP_GET_REPORT, arg)
        fw_error, vmm_error = struct.unpack_from("<II", arg, 24)
        if fw_error or vmm_error:
            raise DeviceError(f"SNP_GET_REPORT failed: firmware error {fw_error:#x}, VMM error {vmm_error:#x}")
        status, size = struct.unpack_from("<II", resp.raw, 0)
        if status != 0 or size != SNP_REPORT_BYTES:
            raise DeviceError(f"SNP report response has status {status:#x} and size {size}")
        return Evidence(self.platform, resp.raw[32:32 + SNP_REPORT_BYTES], self.endorsements)


class NitroNsmProvider:
    """Nitro attestation documents from the NSM device; report data goes into ``user_data``."""

    platform = "nitro"

    def __init__(self, device: str | Path = "/dev/nsm", *, ioctl: Ioctl = fcntl.ioctl) -> None:
        self.device, self._ioctl = device, ioctl

    def attest(self, report_data: bytes, *, nonce: bytes | None = None, public_key: bytes | None = None) -> Evidence:
        _check_report_data(report_data)
        request = cbor2.dumps({"Attestation": {"user_data": report_data, "nonce": nonce, "public_key": public_key}})
        req = ctypes.create_string_buffer(request, len(request))
        resp = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
        arg = bytearray(struct.pack("<QQQQ", ctypes.addressof(req), len(request), ctypes.addressof(resp),
                                    NSM_RESPONSE_MAX))
        _call(self.device, self._ioctl, NSM_IOCTL_REQUEST, arg)
        (length,) = struct.unpack_from("<Q", arg, 24)
        if not 0 < length <= NSM_RESPONSE_MAX:
            raise DeviceError(f"NSM answered {length} bytes")
        try:
            answer = cbor2.loads(resp.raw[:length])
        except Exception as exc:  # any decoding failure of the device's answer is a device failure
            raise DeviceError(f"NSM answer is not CBOR ({type(exc).__name__})") from None
        if isinstance(answer, dict) and "Error" in answer:
            raise DeviceError(f"NSM refused the attestation request: {answer['Error']}")
        body = answer.get("Attestation") if isinstance(answer, dict) else None
        document = body.get("document") if isinstance(body, dict) else None
        if not isinstance(document, bytes) or not document:
            raise DeviceError("NSM answer holds no attestation document")
        return Evidence(self.platform, document)
