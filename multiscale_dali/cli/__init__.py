"""The ``msdali`` command line: parse flags, call library code, print results.

``main`` holds the command group and turns every :class:`~multiscale_dali.errors.UserError` into a
one-line message; each command has a module of its own; ``params`` and ``options`` hold the flag
types and the flags several commands share.
"""
