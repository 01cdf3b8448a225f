"""How the peers that cannot serve `scoring.v1.Scorer/Score` are called, light to import (no framework): the
load generator sends each system the same ScoreRequests, wrapped once before the clock starts in that
framework's own protocol.

- MLServer: Open Inference Protocol gRPC, `ModelInfer` with one BYTES tensor `request` of shape [1] holding the
  serialized ScoreRequest; the answer is a BYTES tensor `response` holding the serialized ScoreResponse.
- LitServe (HTTP only): `POST /predict` with the request as JSON (protobuf's JSON mapping); the answer is JSON.
"""

from __future__ import annotations

from google.protobuf import json_format

from scoring.v1 import scoring_pb2
from server.responses import field_bytes, varint

OIP_METHOD = "/inference.GRPCInferenceService/ModelInfer"
OIP_MODEL = "scoring"  # the model name MLServer serves
OIP_INPUT, OIP_OUTPUT, OIP_BYTES = "request", "response", "BYTES"
LITSERVE_PATH = "/predict"


def oip_infer_request(score_request: bytes, model: str = OIP_MODEL) -> bytes:
    """A serialized `inference.ModelInferRequest` (dataplane.proto) carrying one serialized ScoreRequest. Written
    by hand from the five fields it needs, so this process needs neither MLServer nor its protobuf stubs (MLServer
    runs in its own environment, see requirements-mlserver.txt)."""
    contents = field_bytes(8, score_request)  # InferTensorContents.bytes_contents
    tensor = (field_bytes(1, OIP_INPUT.encode()) + field_bytes(2, OIP_BYTES.encode())  # name, datatype
              + field_bytes(3, varint(1)) + field_bytes(5, contents))  # shape [1] (packed int64), contents
    return field_bytes(1, model.encode()) + field_bytes(5, tensor)  # model_name, inputs[0]


def json_request(score_request: bytes) -> bytes:
    """The ScoreRequest as the JSON body LitServe is sent (field names in lowerCamelCase, as protobuf maps them)."""
    message = scoring_pb2.ScoreRequest.FromString(score_request)
    text: str = json_format.MessageToJson(message, indent=None, ensure_ascii=False)
    return text.encode()


def for_protocol(protocol: str, requests: list[bytes]) -> list[bytes]:
    """The serialized ScoreRequests as `protocol` ("scorer", "oip" or "json") carries them."""
    if protocol == "oip":
        return [oip_infer_request(r) for r in requests]
    if protocol == "json":
        return [json_request(r) for r in requests]
    return requests
