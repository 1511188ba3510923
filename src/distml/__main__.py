"""``python -m distml`` is the ``distml`` command."""

from distml.cli.main import main

main()
