"""Enclave descriptions for `veil worker`: a Gramine manifest template and a Nitro image."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import veil
from veil.tee.manifest import gramine_manifest, nitro_build_commands, nitro_dockerfile


def test_gramine_manifest_is_toml_with_dcap_attestation_and_measured_code():
    text = gramine_manifest(worker_args=["--queue", "rediss://redis:6380/0", "--attest", "sgx"], model_dir="/srv/m")
    manifest = tomllib.loads(text)
    sgx = manifest["sgx"]
    assert sgx["remote_attestation"] == "dcap" and sgx["debug"] is False
    python = str(Path(sys.executable).resolve())
    assert manifest["libos"]["entrypoint"] == python
    assert manifest["loader"]["argv"] == [python, "-m", "veil.serve.worker", "--queue", "rediss://redis:6380/0",
                                          "--attest", "sgx"]
    trusted = sgx["trusted_files"]
    veil_dir = Path(veil.__file__).resolve().parent
    assert f"file:{python}" in trusted
    assert any(veil_dir.is_relative_to(t.removeprefix("file:").rstrip("/")) for t in trusted if t.endswith("/"))
    assert "file:/srv/m/" in sgx["allowed_files"] and not any(t.startswith("file:/srv/m") for t in trusted)
    assert {"path": "/srv/m", "uri": "file:/srv/m"} in manifest["fs"]["mounts"]


def test_gramine_manifest_takes_no_secret_or_host_input():
    text = gramine_manifest()
    manifest = tomllib.loads(text)
    loader = manifest["loader"]
    assert "insecure__use_cmdline_argv" not in loader and "insecure__use_host_env" not in loader
    assert all(isinstance(v, str) for v in loader["env"].values())  # fixed values, no passthrough
    assert "VEIL_MODEL_KEY" not in text
    assert "{{ gramine.libos }}" in text  # a template for gramine-manifest


def test_nitro_image_runs_the_worker_and_is_built_without_debug_mode():
    dockerfile = nitro_dockerfile(worker_args=["--attest", "nitro"])
    assert dockerfile.splitlines()[-1] == 'CMD ["python", "-m", "veil.serve.worker", "--attest", "nitro"]'
    assert "--require-hashes" in dockerfile
    commands = nitro_build_commands(image="veil:enc", eif="w.eif", cpu_count=4, memory_mib=8192)
    assert commands[1] == "nitro-cli build-enclave --docker-uri veil:enc --output-file w.eif"
    assert commands[2] == "nitro-cli run-enclave --eif-path w.eif --cpu-count 4 --memory 8192"
    assert not any("--debug-mode" in c for c in commands)
