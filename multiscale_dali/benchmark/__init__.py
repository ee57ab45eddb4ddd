"""``msdali benchmark``: loader throughput, training step speed and memory, machine description.
"""
