"""What a person reads: progress bars, TensorBoard logging and PNG plots of a run directory.
"""
