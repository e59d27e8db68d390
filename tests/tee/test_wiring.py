"""The pieces that wire `veil.tee` into the product: SGX/TDX collateral from a file or a PCCS (a fake
one on loopback serving Intel's recorded answers), provider selection and device detection, plug-in
names, nonces bound to the worker that asked, and `veil tee manifest`."""

from __future__ import annotations

import contextlib
import json
import threading
import tomllib
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.tee import vectors
from tests.tee.fakeplatform import PLATFORM, FakePlatform, FakeVerifier
from tests.tee.vectors import write_policy
from veil import cli
from veil.tee import CollateralError, DcapVerifier, DeviceError, Evidence, KeyBroker, KeyRequester, NonceError
from veil.tee.collateral import FileCollateral, PccsCollateral, with_collateral
from veil.tee.dcap import parse_quote_frame
from veil.tee.plugins import PluginError, load_object
from veil.tee.providers import (
    NO_DEVICE,
    GramineProvider,
    NitroNsmProvider,
    SevGuestProvider,
    TsmProvider,
    detect,
    provider_for,
)

CASE = "automata-sgx-v3"
FMSPC = "00606a000000"


def _recorded_pcs() -> dict[str, tuple[bytes, dict[str, str]]]:
    """Intel's answers for the recorded SGX quote, as a PCCS serves them (bodies, issuer-chain headers)."""
    quote_file, _, tcb_info, qe_identity, pck_crl, _, _ = vectors.DCAP_CASES[CASE]
    quote = vectors.read(f"sgx-tdx/{quote_file}")
    chain = x509.load_pem_x509_certificates(parse_quote_frame(quote).pck_chain_pem.rstrip(b"\0"))
    crl_chain = b"".join(c.public_bytes(Encoding.PEM) for c in chain[1:])
    signing = vectors.tcb_signing_chain()
    quoted = {"TCB-Info-Issuer-Chain": urllib.parse.quote(signing.decode()),
              "SGX-Enclave-Identity-Issuer-Chain": urllib.parse.quote(signing.decode()),
              "SGX-PCK-CRL-Issuer-Chain": urllib.parse.quote(crl_chain.decode())}
    return {
        f"/sgx/certification/v4/tcb?fmspc={FMSPC}": (vectors.read(f"sgx-tdx/{tcb_info}"),
                                                     {"TCB-Info-Issuer-Chain": quoted["TCB-Info-Issuer-Chain"]}),
        "/sgx/certification/v4/qe/identity": (vectors.read(f"sgx-tdx/{qe_identity}"),
                                              {"SGX-Enclave-Identity-Issuer-Chain":
                                               quoted["SGX-Enclave-Identity-Issuer-Chain"]}),
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der": (
            vectors.read(f"sgx-tdx/{pck_crl}"), {"SGX-PCK-CRL-Issuer-Chain": quoted["SGX-PCK-CRL-Issuer-Chain"]}),
        "/sgx/certification/v4/rootcacrl": (vectors.read(f"sgx-tdx/{vectors.ROOT_CA_CRL}").hex().encode(), {}),
    }


@contextlib.contextmanager
def fake_pccs(answers: dict[str, tuple[bytes, dict[str, str]]]) -> Iterator[tuple[str, list[str]]]:
    """A PCCS on a free loopback port answering exactly `answers` (path with query -> body, headers), 404 else."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body, headers = answers.get(self.path, (b'{"error": "not found"}', None))
            self.send_response(200 if headers is not None else 404)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _quote_evidence() -> tuple[Evidence, object]:
    quote_file, platform, *_, when, _ = vectors.DCAP_CASES[CASE]
    return Evidence(platform, vectors.read(f"sgx-tdx/{quote_file}")), vectors.at(when)


def test_collateral_fetched_from_a_pccs_verifies_the_recorded_quote_and_is_cached():
    evidence, when = _quote_evidence()
    with fake_pccs(_recorded_pcs()) as (url, asked):
        source = PccsCollateral(url)
        completed = with_collateral(evidence, source)
        claims = DcapVerifier([vectors.intel_root()], "sgx").verify(completed, at=when)
        assert claims.platform == "sgx" and claims.tcb_status == vectors.DCAP_CASES[CASE][-1]
        assert len(asked) == 4 and with_collateral(evidence, source) == completed and len(asked) == 4
        source.close()
    assert f"fmspc={FMSPC}" in asked[0] and "ca=platform" in asked[2], "FMSPC and CA come from the quote"


def test_a_pccs_source_closes_its_http_client_once_or_twice_and_on_leaving_with():
    """The PCCS source's HTTP client is open after a fetch, closed by `close` (a second close is
    harmless) and by leaving a ``with`` block."""
    evidence, _ = _quote_evidence()
    with fake_pccs(_recorded_pcs()) as (url, asked):
        source = PccsCollateral(url)
        source.collateral(evidence)
        assert len(asked) == 4 and not source._http.is_closed
        source.close()
        assert source._http.is_closed
        source.close()
        with PccsCollateral(url) as fetched:
            assert fetched.collateral(evidence) and not fetched._http.is_closed
        assert fetched._http.is_closed


@pytest.mark.parametrize("broken", ["missing", "no chain", "not a crl"])
def test_a_pccs_that_answers_wrongly_is_a_collateral_error(broken):
    answers = _recorded_pcs()
    tcb = f"/sgx/certification/v4/tcb?fmspc={FMSPC}"
    if broken == "missing":
        del answers["/sgx/certification/v4/qe/identity"]
    elif broken == "no chain":
        answers[tcb] = (answers[tcb][0], {})
    else:
        answers["/sgx/certification/v4/rootcacrl"] = (b"\x30\x03\x02\x01\x00", {})
    evidence, _ = _quote_evidence()
    with fake_pccs(answers) as (url, _), pytest.raises(CollateralError):
        PccsCollateral(url).collateral(evidence)


def test_an_unreachable_pccs_and_a_bad_url_are_refused():
    evidence, _ = _quote_evidence()
    with pytest.raises(CollateralError, match="cannot fetch"):
        PccsCollateral("http://127.0.0.1:9", timeout=2).collateral(evidence)
    with pytest.raises(ValueError):
        PccsCollateral("ftp://pccs")


def test_collateral_file_is_validated_and_followed(tmp_path):
    evidence, when = _quote_evidence()
    _, _, tcb_info, qe_identity, pck_crl, _, _ = vectors.DCAP_CASES[CASE]
    good = vectors.collateral(evidence.blob, tcb_info, qe_identity, pck_crl)
    path = tmp_path / "collateral.json"
    path.write_bytes(good)
    source = FileCollateral(path)
    assert DcapVerifier([vectors.intel_root()], "sgx").verify(with_collateral(evidence, source), at=when)
    path.write_text("{}")
    with pytest.raises(CollateralError):
        source.collateral(evidence)
    with pytest.raises(CollateralError):
        FileCollateral(tmp_path / "absent.json")
    snp = Evidence("sev-snp", b"\x00" * 1184)
    assert with_collateral(snp, source) is snp, "only SGX/TDX evidence takes Intel collateral"


def test_each_platform_has_its_provider_and_detection_names_the_devices(tmp_path):
    assert isinstance(provider_for("sgx"), GramineProvider)
    assert isinstance(provider_for("tdx"), TsmProvider) and provider_for("tdx").platform == "tdx"
    assert isinstance(provider_for("sev-snp"), TsmProvider | SevGuestProvider)
    assert isinstance(provider_for("nitro"), NitroNsmProvider)
    with pytest.raises(ValueError, match="unknown TEE platform"):
        provider_for("veil-test")
    with pytest.raises(DeviceError):
        provider_for("sgx").attest(bytes(64))
    assert detect(tmp_path) is None
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nsm").touch()
    assert detect(tmp_path) == ("nitro", "/dev/nsm")
    for device in ("/dev/attestation", "/dev/sev-guest", "/dev/tdx_guest", "/dev/nsm", "/sys/kernel/config/tsm"):
        assert device in NO_DEVICE


@pytest.mark.parametrize("spec", ["no colon", "os:", ":path", "no_such_module_here:x", "os:no_such_attr",
                                  "os:sep", "os.path:join;rm"])
def test_plugin_names_are_checked(spec):
    with pytest.raises(PluginError):
        load_object(spec, "provider")


def test_plugin_names_load_callables():
    assert load_object("tests.tee.fakeplatform:FakeVerifier", "verifier") is FakeVerifier
    assert load_object("os.path:join", "x")("a", "b") == "a/b"


def test_a_nonce_is_usable_only_by_the_worker_it_was_issued_to(tmp_path):
    machine = FakePlatform()
    trusted = {"roots": [machine.root_pem], "measurements": [machine.measurement.hex()]}
    policy = write_policy(tmp_path, {PLATFORM: trusted}, plugins={PLATFORM: FakeVerifier})
    broker = KeyBroker(policy, bytes(range(32)))
    requester = KeyRequester(broker.challenge("worker-a"))
    request = requester.request(machine.attest(requester.report_data))
    with pytest.raises(NonceError, match="another worker"):
        broker.release(request, owner="worker-b")
    assert broker.counter.refusals() == {(PLATFORM, "NonceError"): 1}
    with pytest.raises(NonceError):
        broker.release(request, owner="worker-a")  # consumed by the refused attempt
    requester = KeyRequester(broker.challenge("worker-a"))
    grant = broker.release(requester.request(machine.attest(requester.report_data)), owner="worker-a")
    assert requester.unwrap(grant) == bytes(range(32))


def test_tee_manifest_command_writes_gramine_and_nitro_descriptions(tmp_path, capsys):
    args = ["tee", "manifest", "--queue", "rediss://redis:6380/0", "--key-broker", "https://front:8000",
            "--key-broker-ca", "/etc/veil/ca.pem", "--token-file", "/secrets/w.token"]
    assert cli.main([*args, "--out", str(tmp_path / "sgx"), "--pccs-url", "https://pccs:8081"]) == 0
    manifest = tomllib.loads((tmp_path / "sgx" / "veil-worker.manifest.template").read_text())
    argv = manifest["loader"]["argv"]
    assert argv[1:3] == ["-m", "veil.serve.worker"] and argv[argv.index("--attest") + 1] == "sgx"
    assert argv[argv.index("--key-broker-token-file") + 1] == "/secrets/w.token"
    assert "file:/secrets/w.token" in manifest["sgx"]["allowed_files"]
    assert "file:/etc/veil/ca.pem" in manifest["sgx"]["trusted_files"]
    assert {"path": "/secrets", "uri": "file:/secrets"} in manifest["fs"]["mounts"]
    assert cli.main([*args, "--out", str(tmp_path / "nitro"), "--platform", "nitro"]) == 0
    dockerfile = (tmp_path / "nitro" / "Dockerfile").read_text()
    command = json.loads(dockerfile.splitlines()[-1].removeprefix("CMD "))
    assert command[:3] == ["python", "-m", "veil.serve.worker"] and "nitro" in command
    assert 'COPY ["worker.token", "/secrets/w.token"]' in dockerfile
    build = (tmp_path / "nitro" / "build.sh").read_text()
    assert "nitro-cli build-enclave" in build and "--debug-mode" not in build
    assert str(tmp_path / "nitro" / "Dockerfile") in capsys.readouterr().out
