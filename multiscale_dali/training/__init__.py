"""Training: configuration, losses, metrics, the trainers, checkpoints and resume, signals,
distributed set-up and the run that wires them together.
"""
