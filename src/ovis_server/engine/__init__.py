"""The engine: diffusers pipelines (Ovis-Image, Z-Image: one module each in ``families``)
under a denoising loop of our own.

This package's top level stays free of torch so that the API process, which never runs
the model, does not pay for importing it: the pipeline lives in
``ovis_server.engine.pipeline``.
"""

from ovis_server.engine.images import MEDIA_TYPES, encode_image
from ovis_server.engine.request import GenerationRequest

__all__ = ["MEDIA_TYPES", "GenerationRequest", "encode_image"]
