"""Networks by name: the model registry and its checks (no data, no training).
"""
