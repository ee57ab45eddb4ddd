"""Images on disk: discovery of class folders, splits, the pre-flight scan, the embedded and synthetic datasets.

The bottom layer: imports nothing else of msdali but its top-level constants and helpers.
"""
