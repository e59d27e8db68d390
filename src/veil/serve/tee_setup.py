"""Trusted execution from the command line and a `ServerConfig`: the policy, the evidence provider,
the collateral source, the key broker a worker asks.

Shared by `veil serve` (a key broker with ``--attest-policy``, an attested enclave with ``--attest``)
and `veil worker` (`veil.serve.worker`, whose options `add_worker_options` defines once), so both
read the options the same way. Light to import (no FastAPI, no Redis): the `veil` command builds
its parser from it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from veil.tee import KeyBroker, load_policy
from veil.tee.collateral import CollateralSource, FileCollateral, PccsCollateral
from veil.tee.plugins import load_object
from veil.tee.policy import VerifierFactory
from veil.tee.providers import PROVIDERS, EvidenceProvider, provider_for

if TYPE_CHECKING:
    from veil.serve.backends.base import Backend
    from veil.serve.server import ServerConfig
    from veil.serve.tee import TeeState

BROKER_TOKEN_ENV = "VEIL_WORKER_TOKEN"


@dataclass(frozen=True)
class KeyBrokerOptions:
    """Where an attesting worker asks for the model key: the front end's URL, a worker token, TLS."""

    url: str
    token: str
    ca: str | None = None


DEFAULT_CLAIM_IDLE = 30.0
"""Seconds a claimed job may sit unacknowledged before another worker takes it over."""


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """Every option of `veil worker`, defined once for the `veil` command and for
    ``python -m veil.serve.worker``."""
    parser.add_argument("--queue", required=True, help="Redis URL, e.g. redis://127.0.0.1:6379/0 (rediss:// for TLS)")
    parser.add_argument("--name", help="consumer name (default: host-pid-random)")
    parser.add_argument("--claim-idle", type=float, default=DEFAULT_CLAIM_IDLE,
                        help="seconds before another worker's unacknowledged job is taken over")
    parser.add_argument("--model-key-file", help="file holding the model key (else VEIL_MODEL_KEY)")
    parser.add_argument("--data-dir", default="veil-data", help="where a model.key may be found")
    parser.add_argument("--max-jobs", type=int, help="exit after this many jobs")
    parser.add_argument("--log-level", default="info")
    add_attest_options(parser)


def add_attest_options(parser: argparse.ArgumentParser) -> None:
    """The options of an attesting worker (shared by `veil worker` and ``python -m veil.serve.worker``)."""
    group = parser.add_argument_group("key release (instead of VEIL_MODEL_KEY)")
    group.add_argument("--attest", choices=sorted(PROVIDERS),
                       help="attest through this platform's device and get the model key from --key-broker")
    group.add_argument("--attest-provider", metavar="MODULE:FACTORY",
                       help="evidence provider plug-in instead of the device (development and tests)")
    group.add_argument("--key-broker", metavar="URL", help="a front end started with --attest-policy")
    group.add_argument("--key-broker-ca", metavar="PEM", help="CA bundle to verify the key broker's TLS")
    group.add_argument("--key-broker-token-file", metavar="FILE",
                       help=f"file holding a worker token (`veil token add NAME --role worker`; "
                            f"else ${BROKER_TOKEN_ENV})")
    group.add_argument("--dcap-collateral", metavar="FILE", help="Intel collateral JSON added to SGX/TDX evidence")
    group.add_argument("--pccs-url", metavar="URL", help="PCCS to fetch SGX/TDX collateral from")


def broker_options(args: argparse.Namespace) -> KeyBrokerOptions | None:
    """`KeyBrokerOptions` from the parsed options, or None without --key-broker."""
    if not args.key_broker:
        return None
    token = (Path(args.key_broker_token_file).read_text().strip() if args.key_broker_token_file
             else os.environ.get(BROKER_TOKEN_ENV, ""))
    if not token:
        raise ValueError(f"--key-broker needs a worker token: --key-broker-token-file or ${BROKER_TOKEN_ENV}")
    return KeyBrokerOptions(args.key_broker, token, args.key_broker_ca)


def verifier_plugins(specs: tuple[str, ...]) -> Mapping[str, VerifierFactory]:
    """``PLATFORM=module:factory`` options as `load_policy` plug-ins."""
    out: dict[str, VerifierFactory] = {}
    for spec in specs:
        platform, sep, target = spec.partition("=")
        if not sep or not platform:
            raise ValueError(f"--attest-verifier takes PLATFORM=module:factory, got {spec!r}")
        out[platform] = load_object(target, "verifier")
    return out


def evidence_provider(config: ServerConfig) -> EvidenceProvider | None:
    """The provider `--attest-provider` names (called with no argument), or `--attest`'s device's."""
    if config.attest_provider:
        provider = load_object(config.attest_provider, "evidence provider")()
        if config.attest and getattr(provider, "platform", None) != config.attest:
            raise ValueError(f"--attest-provider gives {getattr(provider, 'platform', None)!r} evidence, "
                             f"not --attest {config.attest!r}")
        return provider
    return provider_for(config.attest) if config.attest else None


def collateral_source(config: ServerConfig) -> CollateralSource | None:
    """Intel collateral from `--dcap-collateral FILE` or `--pccs-url URL` (not both), else None."""
    if config.dcap_collateral and config.pccs_url:
        raise ValueError("give --dcap-collateral or --pccs-url, not both")
    if config.dcap_collateral:
        return FileCollateral(config.dcap_collateral)
    if config.pccs_url:
        return PccsCollateral(config.pccs_url)
    return None


def tee_state(config: ServerConfig, model_key: bytes, backend: Backend) -> TeeState:
    """The server's `TeeState`: a broker if `attest_policy`, an attester if `attest`/`attest_provider`.
    The broker keeps its nonces where `backend` shares them between front ends (in memory if nowhere).

    An attester needs the TLS certificate (clients check the evidence binds its key) and attests
    once here, so a server that cannot attest fails at start, not at its first client."""
    from veil.serve.tee import EnclaveAttester, TeeState, read_spki

    collateral = collateral_source(config)
    broker = None
    if config.attest_policy:
        policy = load_policy(config.attest_policy, plugins=verifier_plugins(config.attest_verifiers))
        broker = KeyBroker(policy, model_key, nonce_ttl=config.nonce_ttl, nonces=backend.nonce_store(config))
    elif config.attest_verifiers:
        raise ValueError("--attest-verifier needs --attest-policy")
    attester = None
    provider = evidence_provider(config)
    if provider is not None:
        if not config.tls_cert:
            raise ValueError("--attest needs --tls-cert: clients check that the evidence binds the TLS key")
        attester = EnclaveAttester(provider, read_spki(config.tls_cert), collateral)
        attester.evidence(os.urandom(32))
    return TeeState(broker=broker, attester=attester, collateral=collateral)
