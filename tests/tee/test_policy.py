"""The policy file: strict parsing (unknown keys, types, hex, roots) and evaluation of claims."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.tee.fakeplatform import PLATFORM, FakePlatform, FakeVerifier
from veil.tee import (
    Claims,
    DebugError,
    MeasurementError,
    PlatformError,
    PolicyError,
    PolicyFileError,
    TcbError,
    load_policy,
    parse_policy,
)

GOOD = "11" * 48


@pytest.fixture()
def machine() -> FakePlatform:
    return FakePlatform(bytes.fromhex(GOOD))


@pytest.fixture()
def base(tmp_path, machine):
    (tmp_path / "root.pem").write_bytes(machine.root_pem)
    return tmp_path


def _load(base, table: dict, name: str = "policy.json", platform: str = PLATFORM):
    path = base / name
    path.write_text(json.dumps({"version": 1, "platforms": {platform: table}}))
    return load_policy(path, plugins={PLATFORM: FakeVerifier})


def test_toml_policy_with_roots_relative_to_the_file(base, machine):
    (base / "policy.toml").write_text(f'version = 1\n[platforms.{PLATFORM}]\nroots = ["root.pem"]\n'
                                      f'measurements = ["{GOOD}"]\nallow_debug = false\n')
    policy = load_policy(base / "policy.toml", plugins={PLATFORM: FakeVerifier})
    claims = policy.verify(machine.attest(bytes(64)))
    assert claims.measurement.hex() == GOOD


@pytest.mark.parametrize("table, message", [
    ({"roots": ["root.pem"], "measurements": [GOOD], "colour": "blue"}, "unknown keys"),
    ({"roots": ["root.pem"]}, "needs 'roots' and 'measurements'"),
    ({"roots": ["root.pem"], "measurements": []}, "non-empty list"),
    ({"roots": ["root.pem"], "measurements": ["xyz"]}, "not hex"),
    ({"roots": ["root.pem"], "measurements": [GOOD], "allow_debug": "no"}, "true or false"),
    ({"roots": ["root.pem"], "measurements": [GOOD], "min_svn": -1}, "integer"),
    ({"roots": ["root.pem"], "measurements": [GOOD], "min_svn": True}, "integer"),
    ({"roots": ["missing.pem"], "measurements": [GOOD]}, "not a regular file"),
    ({"roots": ["policy.json"], "measurements": [GOOD]}, "not a valid X.509"),
    ({"roots": ["root.pem"], "measurements": [GOOD], "tcb_status": ["UpToDate"]}, "only to sgx and tdx"),
    ({"roots": ["root.pem"], "measurements": [GOOD], "max_vmpl": 0}, "only to sev-snp"),
    ({"roots": ["root.pem"], "measurements": [GOOD], "registers": []}, "table"),
    ({"roots": ["root.pem"], "measurements": [GOOD], "min_tcb": {"x": "1"}}, "integer"),
])
def test_policy_file_mistakes_are_refused(base, table, message):
    with pytest.raises(PolicyFileError, match=message):
        _load(base, table)


@pytest.mark.parametrize("platform, table, message", [
    ("sev-snp", {"roots": ["root.pem"], "measurements": ["11" * 32]}, "32 bytes, expected 48"),
    ("sev-snp", {"roots": ["root.pem"], "measurements": [GOOD], "min_tcb": {"isv_svn": 1}}, "not a TCB component"),
    ("sgx", {"roots": ["root.pem"], "measurements": ["11" * 32], "tcb_status": ["Revoked"]}, "unknown statuses"),
    ("quantum", {"roots": ["root.pem"], "measurements": [GOOD]}, "unknown platform"),
])
def test_platform_specific_mistakes_are_refused(base, platform, table, message):
    with pytest.raises(PolicyFileError, match=message):
        _load(base, table, platform=platform)


@pytest.mark.parametrize("data", [[], {"version": 1}, {"version": 2, "platforms": {"x": {}}},
                                  {"version": True, "platforms": {"x": {}}}, {"version": 1, "platforms": {}},
                                  {"version": 1, "platforms": {}, "extra": 1}])
def test_top_level_is_strict(tmp_path, data):
    with pytest.raises(PolicyFileError):
        parse_policy(data, base_dir=tmp_path)


@pytest.mark.timeout(60)
def test_a_policy_path_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: a policy path that is not a regular
    file (a FIFO, a directory) is refused before it is opened, as the root files already were."""
    fifo = tmp_path / "policy.toml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyFileError, match="not a regular file"):
        load_policy(fifo)
    with pytest.raises(PolicyFileError, match="not a regular file"):
        load_policy(tmp_path)


def test_unreadable_or_invalid_files_are_policy_errors(tmp_path):
    with pytest.raises(PolicyFileError, match="cannot read"):
        load_policy(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("version = = 1")
    with pytest.raises(PolicyFileError, match="TOML"):
        load_policy(tmp_path / "bad.toml")
    (tmp_path / "bad.json").write_bytes(b"\xff")
    with pytest.raises(PolicyFileError):
        load_policy(tmp_path / "bad.json")


def test_plugins_cannot_replace_builtin_verifiers(tmp_path):
    with pytest.raises(PolicyFileError, match="built-in"):
        parse_policy({"version": 1, "platforms": {"x": {}}}, base_dir=tmp_path, plugins={"sgx": FakeVerifier})


def _claims(root: str, **changes) -> Claims:
    fields = {"platform": PLATFORM, "measurement": bytes.fromhex(GOOD), "report_data": bytes(64), "debug": False,
              "root_sha256": root, "signer": b"\x05" * 32, "product_id": 3, "svn": 4,
              "tcb": {"a": 2}, "registers": {"r": b"\x09"}, "details": {}}
    return Claims(**{**fields, **changes})


def test_evaluation_order_and_each_requirement(base, machine):
    policy = _load(base, {"roots": ["root.pem"], "measurements": [GOOD], "signers": ["05" * 32],
                          "product_ids": [3], "min_svn": 4, "min_tcb": {"a": 2}, "registers": {"r": ["09"]}})
    root = hashlib.sha256(machine.root.public_bytes(Encoding.DER)).hexdigest()
    rules = policy.platforms[PLATFORM]
    rules.check(_claims(root))
    for change, error in [({"root_sha256": "00" * 32}, PolicyError), ({"debug": True}, DebugError),
                          ({"measurement": b"\x12" * 48}, MeasurementError), ({"signer": None}, MeasurementError),
                          ({"product_id": 4}, MeasurementError), ({"svn": 3}, TcbError), ({"svn": None}, TcbError),
                          ({"tcb": {"a": 1}}, TcbError), ({"tcb": {}}, TcbError),
                          ({"tcb_status": "OutOfDate"}, TcbError),
                          ({"registers": {}}, MeasurementError), ({"platform": "sgx"}, PlatformError)]:
        with pytest.raises(error):
            rules.check(_claims(root, **change))
    with pytest.raises(PlatformError):
        policy.check(_claims(root, platform="nitro"))
