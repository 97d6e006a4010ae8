"""Client-side retries: a gRPC service config that retries UNAVAILABLE on tensorgate's services.

gRPC's own retry machinery does the work (in the channel, for every language that reads a service config): a call
that fails with UNAVAILABLE (server draining or restarting, a model loading, a version out of rotation) is tried
again, up to `maxAttempts` in all, after a randomized exponential backoff, or after the server's retry hint
(`grpc-retry-pushback-ms` trailer) when it sends one. A stream is retried only until its first response arrives.
RESOURCE_EXHAUSTED is not retried automatically: the server is shedding load, and retrying at once would add to it;
it carries the same hint (`grpc-retry-pushback-ms`, and `retry-after` in seconds) for callers that wait and retry
themselves. Retry throttling stops retries while most calls fail, so a dead server is not hammered.

`Client` and `AsyncClient` use it by default (`DEFAULT_CHANNEL_OPTIONS`); pass `options=NO_RETRIES` to turn it off.
Other languages: give `RETRY_SERVICE_CONFIG_JSON` as the channel's default service config (see README).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["NO_RETRIES", "RETRIED_SERVICES", "RETRY_OPTIONS", "RETRY_SERVICE_CONFIG", "RETRY_SERVICE_CONFIG_JSON"]

#: The services whose calls are retried (every method of each).
RETRIED_SERVICES = (
    "tensorgate.v1.Predict",
    "tensorgate.v1.Stream",
    "tensorgate.v1.Models",
    "inference.GRPCInferenceService",
)

#: The service config, as a dict (gRPC's JSON form: https://github.com/grpc/grpc/blob/master/doc/service_config.md).
RETRY_SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [{"service": service} for service in RETRIED_SERVICES],
            "retryPolicy": {
                # gRPC caps attempts at 5; the backoffs before attempts 2..4 are random in [0, 0.1 s], [0, 0.2 s],
                # [0, 0.4 s]: enough to ride out a restart's refused connections without piling up.
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    # Per server: each failed attempt costs a token, each success gives back 0.2; at half of maxTokens (after about
    # ten failures in a row) retries stop until calls succeed again.
    "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.2},
}

#: The same, as the JSON text channels take (`grpc.service_config`).
RETRY_SERVICE_CONFIG_JSON = json.dumps(RETRY_SERVICE_CONFIG, separators=(",", ":"))

#: Channel options that turn the retries on (part of the clients' defaults).
RETRY_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", RETRY_SERVICE_CONFIG_JSON),
)

#: Pass as (or with) a client's `options` to turn retries off: each failure is raised at once.
NO_RETRIES: tuple[tuple[str, Any], ...] = (("grpc.enable_retries", 0),)
