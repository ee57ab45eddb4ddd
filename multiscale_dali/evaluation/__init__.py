"""After training: evaluation of a checkpoint at every scale and prediction on image files.
"""
