"""Evidence providers against fake devices: a temporary /dev/attestation and TSM configfs, fake ioctls."""

from __future__ import annotations

import ctypes
import shutil
import struct
import uuid
from pathlib import Path

import cbor2
import pytest

from veil.tee import DeviceError
from veil.tee.providers import (
    NSM_IOCTL_REQUEST,
    NSM_RESPONSE_MAX,
    SNP_CERT_GUIDS,
    SNP_GET_REPORT,
    GramineProvider,
    NitroNsmProvider,
    SevGuestProvider,
    TsmProvider,
    parse_snp_cert_table,
)

REPORT_DATA = bytes(range(64))
GUIDS = {name: guid for guid, name in SNP_CERT_GUIDS.items()}


def test_gramine_writes_report_data_and_reads_the_quote(tmp_path):
    (tmp_path / "attestation_type").write_text("dcap\n")
    (tmp_path / "quote").write_bytes(b"QUOTE")
    evidence = GramineProvider(tmp_path).attest(REPORT_DATA)
    assert evidence.platform == "sgx" and evidence.blob == b"QUOTE"
    assert (tmp_path / "user_report_data").read_bytes() == REPORT_DATA


def test_gramine_absent_or_without_dcap_is_a_device_error(tmp_path):
    with pytest.raises(DeviceError, match="not running in a Gramine"):
        GramineProvider(tmp_path / "missing").attest(REPORT_DATA)
    (tmp_path / "attestation_type").write_text("none")
    with pytest.raises(DeviceError, match="remote_attestation"):
        GramineProvider(tmp_path).attest(REPORT_DATA)
    with pytest.raises(ValueError):
        GramineProvider(tmp_path).attest(b"short")


def cert_table(entries: dict[str, bytes]) -> bytes:
    header_size = 24 * (len(entries) + 1)
    header, body = b"", b""
    for name, data in entries.items():
        header += GUIDS[name].bytes + struct.pack("<II", header_size + len(body), len(data))
        body += data
    return header + bytes(24) + body


class FakeTsm(TsmProvider):
    """configfs stand-in: creating an entry creates its attribute files as the kernel would."""

    def __init__(self, root: Path, provider: str, outblob: bytes, auxblob: bytes | None = None,
                 generations: tuple[int, int] = (1, 1)) -> None:
        super().__init__(root)
        self.provider, self.outblob, self.auxblob = provider, outblob, auxblob
        self.generations = list(generations)
        self.entries: list[Path] = []
        self.inblobs: list[bytes] = []

    def _create_entry(self) -> Path:
        entry = super()._create_entry()
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "outblob").write_bytes(self.outblob)
        if self.auxblob is not None:
            (entry / "auxblob").write_bytes(self.auxblob)
        self.entries.append(entry)
        return entry

    def _generation(self, entry: Path) -> int:
        self.inblobs.append((entry / "inblob").read_bytes())
        return self.generations.pop(0)

    def _remove_entry(self, entry: Path) -> None:
        shutil.rmtree(entry)


def test_tsm_tdx_quote(tmp_path):
    tsm = FakeTsm(tmp_path, "tdx_guest", b"TDXQUOTE")
    evidence = tsm.attest(REPORT_DATA)
    assert (evidence.platform, evidence.blob, dict(evidence.endorsements)) == ("tdx", b"TDXQUOTE", {})
    assert tsm.inblobs == [REPORT_DATA] * 2 and not any(p.exists() for p in tsm.entries)


def test_tsm_sev_snp_report_with_its_vcek_from_the_certificate_table(tmp_path):
    table = cert_table({"ark": b"ARK", "ask": b"ASK", "vcek": b"VCEK-DER"})
    evidence = FakeTsm(tmp_path, "sev_guest", b"R" * 1184, table).attest(REPORT_DATA)
    assert evidence.platform == "sev-snp" and dict(evidence.endorsements) == {"vcek": b"VCEK-DER"}


def test_tsm_refuses_races_unknown_providers_and_absence(tmp_path):
    with pytest.raises(DeviceError, match="concurrent"):
        FakeTsm(tmp_path, "tdx_guest", b"Q", generations=(1, 2)).attest(REPORT_DATA)
    with pytest.raises(DeviceError, match="provider"):
        FakeTsm(tmp_path, "arm_cca_guest", b"Q").attest(REPORT_DATA)
    with pytest.raises(DeviceError, match="expected sev-snp"):
        tsm = FakeTsm(tmp_path, "tdx_guest", b"Q")
        tsm.platform = "sev-snp"
        tsm.attest(REPORT_DATA)
    with pytest.raises(DeviceError, match="no TSM report interface"):
        TsmProvider(tmp_path / "absent").attest(REPORT_DATA)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("table", [b"\x01" * 24, cert_table({"vcek": b"V"})[:30],
                                   GUIDS["vcek"].bytes + struct.pack("<II", 1000, 10) + bytes(24)])
def test_snp_certificate_table_is_parsed_strictly(table):
    with pytest.raises(DeviceError):
        parse_snp_cert_table(table)


def test_snp_certificate_table_ignores_unknown_guids():
    table = cert_table({"vcek": b"V"})
    unknown = uuid.uuid4().bytes + table[16:]
    assert parse_snp_cert_table(unknown) == {}


def _device(tmp_path: Path) -> Path:
    device = tmp_path / "device"
    device.write_bytes(b"")
    return device


def test_sev_guest_ioctl_request_and_response(tmp_path):
    report = bytes([7]) * 1184
    seen = {}

    def ioctl(fd, request, arg, mutate):
        assert request == SNP_GET_REPORT == 0xC0205300 and mutate
        version, req, resp, _ = struct.unpack("<B7xQQQ", arg)
        seen["version"], seen["req"] = version, ctypes.string_at(req, 96)
        answer = struct.pack("<II", 0, 1184) + bytes(24) + report
        ctypes.memmove(resp, answer, len(answer))
        return 0

    evidence = SevGuestProvider(_device(tmp_path), vmpl=1, endorsements={"vcek": b"V"}, ioctl=ioctl).attest(
        REPORT_DATA)
    assert evidence.blob == report and dict(evidence.endorsements) == {"vcek": b"V"}
    assert seen == {"version": 1, "req": REPORT_DATA + struct.pack("<I", 1) + bytes(28)}


def test_sev_guest_errors(tmp_path):
    def firmware_error(fd, request, arg, mutate):
        arg[24:32] = struct.pack("<II", 0x16, 0)
        return 0

    with pytest.raises(DeviceError, match="firmware error 0x16"):
        SevGuestProvider(_device(tmp_path), ioctl=firmware_error).attest(REPORT_DATA)

    def bad_size(fd, request, arg, mutate):
        _, _, resp, _ = struct.unpack("<B7xQQQ", arg)
        ctypes.memmove(resp, struct.pack("<II", 0, 100), 8)
        return 0

    with pytest.raises(DeviceError, match="size 100"):
        SevGuestProvider(_device(tmp_path), ioctl=bad_size).attest(REPORT_DATA)

    def refused(fd, request, arg, mutate):
        raise OSError(5, "Input/output error")

    with pytest.raises(DeviceError, match="Input/output"):
        SevGuestProvider(_device(tmp_path), ioctl=refused).attest(REPORT_DATA)
    with pytest.raises(DeviceError, match="cannot open"):
        SevGuestProvider(tmp_path / "no-sev-guest").attest(REPORT_DATA)


def _nsm(answer: object, seen: dict):
    def ioctl(fd, request, arg, mutate):
        assert request == NSM_IOCTL_REQUEST == 0xC0200A00 and mutate
        req, req_len, resp, resp_len = struct.unpack("<QQQQ", arg)
        assert resp_len == NSM_RESPONSE_MAX
        seen["request"] = cbor2.loads(ctypes.string_at(req, req_len))
        data = answer if isinstance(answer, bytes) else cbor2.dumps(answer)
        ctypes.memmove(resp, data, len(data))
        arg[24:32] = struct.pack("<Q", len(data))
        return 0
    return ioctl


def test_nitro_nsm_attestation_request(tmp_path):
    seen: dict = {}
    provider = NitroNsmProvider(_device(tmp_path), ioctl=_nsm({"Attestation": {"document": b"DOC"}}, seen))
    evidence = provider.attest(REPORT_DATA, nonce=b"n" * 32, public_key=b"k" * 32)
    assert evidence.platform == "nitro" and evidence.blob == b"DOC"
    assert seen["request"] == {"Attestation": {"user_data": REPORT_DATA, "nonce": b"n" * 32,
                                               "public_key": b"k" * 32}}


@pytest.mark.parametrize("answer", [{"Error": "InvalidArgument"}, {"Attestation": {}}, {"Attestation": 5}, [1],
                                    b"\xff\xff"])
def test_nitro_nsm_errors(tmp_path, answer):
    with pytest.raises(DeviceError):
        NitroNsmProvider(_device(tmp_path), ioctl=_nsm(answer, {})).attest(REPORT_DATA)


def test_nitro_nsm_absent(tmp_path):
    with pytest.raises(DeviceError, match="cannot open"):
        NitroNsmProvider(tmp_path / "nsm").attest(REPORT_DATA)
