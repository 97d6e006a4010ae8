"""The Open Inference Protocol adapter (KServe v2 / Triton's `inference.GRPCInferenceService`)."""

from tensorgate.server.api.oip.servicer import EXTENSIONS, InferenceServicer

__all__ = ["EXTENSIONS", "InferenceServicer"]
