"""The ``distml`` command line: a thin layer over the stage packages."""
