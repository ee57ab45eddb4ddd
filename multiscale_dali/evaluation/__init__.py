"""After training: evaluation of a checkpoint at every scale and prediction on image files.

``evaluate`` runs the resolution sweep (with optional BatchNorm recalibration, ``batchnorm``) and
``report`` tabulates it; ``predict`` classifies image files; both rebuild the network with ``model``.
"""
