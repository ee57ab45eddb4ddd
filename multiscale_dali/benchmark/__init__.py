"""``msdali benchmark``: loader throughput, training step speed and memory, machine description.

``core`` runs every section (:func:`~multiscale_dali.benchmark.core.run_benchmark`); the sections:

* ``config`` (backends, sweeps, :class:`~multiscale_dali.benchmark.config.BenchConfig`) and
  ``dataset`` (the files read, described, pre-read into the page cache);
* ``measure``: timed windows and trials run in interleaved rounds, with their summaries;
* ``baseline`` (the seed project's decode-per-scale loader) and ``loaders`` (loader throughput);
* ``step`` (training-step throughput against a synthetic ceiling) and ``memory`` (peak memory of
  one step, naive vs. memory-efficient, in a fresh subprocess);
* ``gpu`` (DALI's decode-only ceiling and ``hw_decoder_load``/thread sweeps);
* ``machine`` (CPU, GPU and library versions);
* ``goals`` (ratios and targets) and ``report`` (Markdown tables, the JSON file).
"""
