"""The DALI backend: the only subpackage of msdali that imports ``nvidia.dali``.
"""
