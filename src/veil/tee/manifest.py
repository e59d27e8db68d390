"""Enclave build descriptions for `veil worker`: a Gramine manifest (SGX) and a Nitro enclave image.

What is measured is what is trusted: everything the worker executes (the Python interpreter, its
standard library, the installed packages including veil, and the fixed command line) is a Gramine
*trusted file* whose hash goes into MRENCLAVE, or part of the Nitro image whose hash is PCR0. The
model store is an *allowed* file: it holds only veil's AES-256-GCM ciphertexts, opened with the key
the enclave receives through key release (`veil.tee.keyrelease`), never from the environment.

`gramine_manifest` writes a manifest template for ``gramine-manifest`` (the ``{{ ... }}`` values are
Gramine's own template variables); ``gramine-sgx-sign`` then computes MRENCLAVE, which goes into the
``sgx`` policy's ``measurements``. `nitro_dockerfile` and `nitro_build_commands` describe the image
that ``nitro-cli build-enclave`` turns into an EIF and prints PCR0/1/2 for the ``nitro`` policy.
"""

from __future__ import annotations

import json
import shlex
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

WORKER_MODULE = "veil.serve.worker"


def _toml(value: object) -> str:
    """A TOML value for strings, booleans, integers and lists of them (JSON strings are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _outermost(paths: Sequence[str]) -> list[str]:
    """The given directories without those inside another one of them (one mount covers both)."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(p != q and Path(p).is_relative_to(q) for q in unique)]


def gramine_manifest(*, worker_args: Sequence[str] = (), python: str | None = None, model_dir: str = "/models",
                     enclave_size: str = "8G", max_threads: int = 64,
                     extra_trusted: Sequence[str] = ()) -> str:
    """A Gramine manifest template running ``python -m veil.serve.worker WORKER_ARGS`` with DCAP attestation.

    Parameters
    ----------
    worker_args : the worker's command line after the module name (fixed: part of the measurement, so
        it must hold no secret; the model key comes by key release, passwords from allowed files).
    python : the interpreter to run (default: this one, ``sys.executable``).
    model_dir : where the encrypted model store is mounted; allowed, not trusted (ciphertext only).
    enclave_size, max_threads : SGX enclave size and thread slots.
    extra_trusted : further files or directories to measure (e.g. the TLS CA bundle).
    """
    python = str(Path(python or sys.executable).resolve())
    prefix_paths = sorted({str(Path(p).resolve()) for p in (
        sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"), sysconfig.get_path("purelib"),
        sysconfig.get_path("platlib")) if p})
    veil_dir = str(Path(__file__).resolve().parents[1])
    prefix_paths = _outermost([*prefix_paths, veil_dir])
    trusted = ["file:{{ gramine.libos }}", "file:{{ gramine.runtimedir() }}/", "file:{{ arch_libdir }}/",
               "file:/usr/{{ arch_libdir }}/", f"file:{python}", *(f"file:{p}/" for p in prefix_paths),
               *(f"file:{p}" for p in extra_trusted)]
    mounts = [{"path": "/lib", "uri": "file:{{ gramine.runtimedir() }}"},
              {"path": "{{ arch_libdir }}", "uri": "file:{{ arch_libdir }}"},
              {"path": "/usr/{{ arch_libdir }}", "uri": "file:/usr/{{ arch_libdir }}"},
              *({"path": p, "uri": f"file:{p}"} for p in _outermost([*prefix_paths, str(Path(python).parent)])),
              {"path": model_dir, "uri": f"file:{model_dir}"},
              {"type": "tmpfs", "path": "/tmp"}]
    argv = [python, "-m", WORKER_MODULE, *worker_args]
    lines = [
        "# Gramine manifest template for `veil worker`, written by veil.tee.manifest.gramine_manifest.",
        "# Render with gramine-manifest, sign with gramine-sgx-sign; put the printed MRENCLAVE into the",
        "# policy's [platforms.sgx] measurements. The model key never comes from the environment: the",
        "# worker obtains it by key release, attesting with the DCAP quote below.",
        f"libos.entrypoint = {_toml(python)}",
        'loader.entrypoint.uri = "file:{{ gramine.libos }}"',
        'loader.log_level = "error"',
        f"loader.argv = {_toml(argv)}",
        'loader.env.LD_LIBRARY_PATH = "/lib:{{ arch_libdir }}:/usr/{{ arch_libdir }}"',
        'loader.env.PYTHONDONTWRITEBYTECODE = "1"',
        'loader.env.OMP_NUM_THREADS = "1"',
        f"fs.mounts = {_toml(mounts)}",
        "sys.enable_extra_runtime_domain_names_conf = true",
        "sgx.debug = false",
        "sgx.edmm_enable = false",
        f"sgx.enclave_size = {_toml(enclave_size)}",
        f"sgx.max_threads = {_toml(max_threads)}",
        'sgx.remote_attestation = "dcap"',
        f"sgx.trusted_files = {_toml(trusted)}",
        f"sgx.allowed_files = {_toml([f'file:{model_dir}/', 'file:/etc/hosts', 'file:/etc/resolv.conf'])}",
        "",
    ]
    return "\n".join(lines)


def nitro_dockerfile(*, worker_args: Sequence[str] = (), base_image: str = "python:3.11-slim",
                     requirements: str = "requirements.txt") -> str:
    """The Docker image a Nitro enclave runs: pinned requirements, veil, and the worker as its fixed command."""
    command = json.dumps(["python", "-m", WORKER_MODULE, *worker_args])
    return "\n".join([
        "# Nitro enclave image for `veil worker`, written by veil.tee.manifest.nitro_dockerfile.",
        "# nitro-cli build-enclave measures this image: PCR0 (image), PCR1 (kernel), PCR2 (application).",
        f"FROM {base_image}",
        "ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        "WORKDIR /app",
        f"COPY {requirements} /app/requirements.txt",
        "RUN pip install --no-cache-dir --require-hashes -r /app/requirements.txt",
        "COPY dist/ /app/dist/",
        "RUN pip install --no-cache-dir --no-deps /app/dist/*.whl",
        f"CMD {command}",
        "",
    ])


def nitro_build_commands(*, image: str = "veil-worker:enclave", eif: str = "veil-worker.eif",
                         cpu_count: int = 2, memory_mib: int = 4096) -> list[str]:
    """Shell commands that build the EIF (printing PCR0/1/2 for the policy) and run it without debug mode."""
    return [
        f"docker build -t {shlex.quote(image)} .",
        f"nitro-cli build-enclave --docker-uri {shlex.quote(image)} --output-file {shlex.quote(eif)}",
        f"nitro-cli run-enclave --eif-path {shlex.quote(eif)} --cpu-count {int(cpu_count)} "
        f"--memory {int(memory_mib)}",
    ]
