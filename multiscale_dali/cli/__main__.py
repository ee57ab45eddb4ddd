"""``python -m multiscale_dali.cli`` and ``torchrun -m multiscale_dali.cli``: the ``msdali`` command."""

from multiscale_dali.cli.main import main

main()
