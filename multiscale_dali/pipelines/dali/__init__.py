"""The DALI backend: the only subpackage of msdali that imports ``nvidia.dali``.

``graph`` holds the pieces of the image graph (read, decode + crop, flip, resize cascade, the
progressive-size source), ``pipeline`` the ``@pipeline_def`` functions that wire them, and
``loader`` the :class:`~multiscale_dali.pipelines.spec.Loader` that iterates them with exact resume.
"""
