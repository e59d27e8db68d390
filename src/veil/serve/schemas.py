"""Pydantic models of every JSON request and response; they define the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from veil.serve.registry import MAX_VERSION
from veil.serve.service import KEY_ID_PATTERN, NAME_PATTERN


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


class ModelInfo(BaseModel):
    name: str
    version: int
    created: float
    model: str
    kind: Literal["affine", "leveled", "product-sum", "staged"] = Field(
        description="affine: a linear model (no ciphertext multiplication); leveled: a network with "
                    "polynomial activations (one rescale per stage); product-sum: a tree ensemble (sums of "
                    "products of 0/1 literals over a public input grid the client encodes); staged: an "
                    "interactive network, its linear stages evaluated here and its other layers on the "
                    "client, one stateless request per stage (the header names the stage)")
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
