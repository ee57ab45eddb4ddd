"""The ``msdali`` command line: parse flags, call library code, print results.
"""
