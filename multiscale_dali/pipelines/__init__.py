"""Loaders that turn files into device batches: the loader spec, sampling, the batch contract,
the scale schedule, the DALI graph (``pipelines.dali``, the only importer of ``nvidia.dali``)
and the torchvision fallback.

Imports ``data`` only; never ``training``.
"""
