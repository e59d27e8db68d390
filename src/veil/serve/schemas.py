"""Pydantic models of every JSON request and response; they define the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from veil.names import NAME_PATTERN
from veil.program.kinds import descriptions, kinds
from veil.serve.backends.base import MAX_VERSION
from veil.serve.service import KEY_ID_PATTERN


def _json_integer(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; strict validation then refuses booleans, strings and
    fractions, so `true` is never read as version 1."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


VersionNumber = Annotated[int, BeforeValidator(_json_integer), Field(strict=True, ge=1, le=MAX_VERSION),
                          WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_VERSION})]
BASE64 = {"format": "byte", "contentEncoding": "base64", "pattern": r"^[A-Za-z0-9+/]*={0,2}$"}


class ErrorBody(BaseModel):
    """Every error answers with this body and a 4xx/5xx status."""

    error: str = Field(description="machine-readable code, e.g. not_found")
    detail: str = Field(description="what went wrong, for a person")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


class KeyInfo(BaseModel):
    key_id: str = Field(description="the caller's own id of the public bundle (another principal registering the "
                                    "same bundle gets another id); send it with predictions")
    owner: str
    params: str = Field(description="fingerprint of the CKKS parameters the keys were made for")
    rotation_steps: list[int]
    created: float


class RegisterKeyJSON(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"bundle": "VkVJTAEC..."}})

    bundle: str = Field(description="base64 of the serialized public bundle (never a secret key)",
                        json_schema_extra=BASE64)


class DeployRequest(BaseModel):
    name: str = Field(pattern=NAME_PATTERN)
    version: VersionNumber | None = Field(default=None, description="default: latest + 1")
    server: dict = Field(description="server.json written by veil.ml's save (weights, no secrets)")
    client: dict = Field(description="client.json written by veil.ml's save (no weights)")


class KeyNeeds(BaseModel):
    """What a public bundle registered for one layout of a model must hold."""

    params: str = Field(description="fingerprint of the CKKS parameters of this layout")
    relin: bool = Field(description="whether relinearization keys are needed (polynomial activations)")
    rotation_steps: list[int] = Field(description="Galois rotation steps the evaluation uses")


KIND_DESCRIPTION = "; ".join(f"{name}: {text}" for name, text in descriptions().items())
"""What each circuit kind computes, from the kinds registry (`veil.program.kinds`): importing
`veil.program` registers every kind the package has before this module reads them."""


class ModelInfo(BaseModel):
    name: str
    version: int
    created: float
    model: str
    kind: Literal[kinds()] = Field(description=KIND_DESCRIPTION)  # type: ignore[valid-type]
    depth: int = Field(ge=0, description="rescales per evaluation: 0 for affine models")
    n_features: int
    n_outputs: int
    layouts: list[str]
    keys: dict[str, KeyNeeds] = Field(description="per layout, the evaluation keys a bundle must hold "
                                                  "(empty for models deployed before this was recorded)")


class ModelDetail(ModelInfo):
    client: dict = Field(description="client specification: parameters, input scales, post-processing")


class PredictJSON(BaseModel):
    key_id: str = Field(json_schema_extra={"pattern": KEY_ID_PATTERN})
    ciphertexts: str = Field(description="base64 of a veil CIPHERTEXTS message", json_schema_extra=BASE64)


class PredictionJSON(BaseModel):
    model: str
    version: int
    ciphertexts: str = Field(description="base64 of the encrypted outputs", json_schema_extra=BASE64)


# Trusted execution (`veil.serve.tee`): key release to attested workers, and attested plaintext serving.
B64_NONCE = {**BASE64, "description": "base64 of 32 random bytes (44 characters)"}
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class EvidenceBody(BaseModel):
    """Platform evidence as `veil.tee.Evidence.to_dict` writes it (bytes in standard base64)."""

    model_config = ConfigDict(extra="forbid")

    platform: str = Field(pattern=r"^[a-z0-9-]{1,32}$", description="sgx, tdx, sev-snp, nitro (or a plug-in's)")
    blob: str = Field(description="the report, quote or document exactly as the platform produced it",
                      json_schema_extra=BASE64)
    endorsements: dict[str, Annotated[str, Field(json_schema_extra=BASE64)]] = Field(
        default_factory=dict, description="vcek/vlek (SEV-SNP), collateral (SGX/TDX): what verifies the blob")


class KeyChallenge(BaseModel):
    """Step 1 of key release: a single-use nonce for the worker token that asked."""

    nonce: str = Field(json_schema_extra=B64_NONCE)
    context: str = Field(description="base64 of the deployment context bound into the report data",
                         json_schema_extra=BASE64)
    expires_in: float = Field(description="seconds the nonce stays usable")


class KeyReleaseRequest(BaseModel):
    """Step 2: the nonce, the worker's ephemeral X25519 public key, and evidence over both."""

    model_config = ConfigDict(extra="forbid")

    nonce: str = Field(json_schema_extra=B64_NONCE)
    public_key: str = Field(description="base64 of the 32-byte X25519 key made in the enclave (44 characters)",
                            json_schema_extra=BASE64)
    evidence: EvidenceBody | None = Field(description="null when the worker cannot attest (refused and counted)")


class KeyReleaseGrant(BaseModel):
    """Step 3: the model key, HPKE-wrapped to the worker's ephemeral key."""

    nonce: str = Field(json_schema_extra=B64_NONCE)
    wrapped_key: str = Field(json_schema_extra=BASE64)


class EvidenceRequest(BaseModel):
    """A client's fresh nonce; the server attests over it and its TLS public key."""

    model_config = ConfigDict(extra="forbid")

    nonce: str = Field(json_schema_extra=B64_NONCE)


class ServerEvidence(BaseModel):
    """The server's evidence: report data = `veil.tee.tls_report_data(nonce, TLS SubjectPublicKeyInfo)`."""

    platform: str
    evidence: EvidenceBody


class PlainPredictRequest(BaseModel):
    """Plaintext features, accepted only by a server running in an attested enclave."""

    model_config = ConfigDict(extra="forbid")

    features: list[list[FiniteFloat]] = Field(min_length=1, description="n_samples rows of n_features numbers")


class PlainPrediction(BaseModel):
    model: str
    version: int
    outputs: list[list[float]] = Field(description="raw outputs (n_samples, n_outputs), before post-processing")

