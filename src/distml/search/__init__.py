"""Hyperparameter search (``distml tune``, ``distml run --search``): Optuna samplers and pruners over distml runs.

Importing the package loads nothing heavy: :mod:`distml.search.config` is read by the config tree, and Optuna is
imported only by the modules that run a study.
"""
