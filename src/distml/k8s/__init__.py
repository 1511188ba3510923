"""Kubernetes: the pipeline rendered for Argo Workflows, Kubeflow Trainer and KServe, and validated.

:func:`distml.k8s.render.render` writes the folder; :func:`distml.k8s.validate.validate_dir` checks one.
"""
