"""The pipeline: a content-addressed step cache, a local DAG runner and the run records (``distml run``)."""
