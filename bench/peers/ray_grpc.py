"""The servicer function Ray Serve's gRPC proxy is given (`grpc_servicer_functions`).

The generated `add_ScorerServicer_to_server` (grpcio-tools ≥ 1.62) also calls
`server.add_registered_method_handlers`, which Ray 2.58's proxy server does not override: those
handlers, bound to the proxy's placeholder servicer, would answer instead of the deployment (every call
fails with "descriptor 'SerializeToString' ... doesn't apply to a 'Mock' object"). This function
registers the same methods, deserializers and serializers through `add_generic_rpc_handlers` only, the
path Ray rewrites to forward calls to the deployment. Kept free of heavy imports: the proxy imports it.
"""

from __future__ import annotations

from typing import Any

import grpc

from scoring.v1 import scoring_pb2


def add_scorer_to_ray_proxy(servicer: Any, server: Any) -> None:
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=scoring_pb2.ScoreRequest.FromString,
            response_serializer=scoring_pb2.ScoreResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("scoring.v1.Scorer", handlers),))
