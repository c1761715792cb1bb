"""The engine: diffusers pipelines (Ovis-Image, Z-Image: one module each in ``families``)
under a denoising loop of our own.

This package's top level imports nothing, so that a module that needs one torch-free part
(the catalogue needs ``engine.request``) does not pay for the rest: the API process, which
never runs the model, does not import torch (the pipeline lives in
``ovis_server.engine.pipeline``), and the command-line client does not import numpy and
Pillow (``engine.images``).
"""
