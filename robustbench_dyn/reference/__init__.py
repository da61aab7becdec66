"""Packaged reference data, read with :mod:`importlib.resources` so that an installed wheel finds it.

- ``imagenet_c_alexnet_error.csv``: AlexNet top-1 error on ImageNet-C per corruption and severity,
  the normalisers of CE and mCE (hendrycks/robustness README at commit 76d93933; the file's header
  names the source). Read it with :func:`robustbench_dyn.metrics.alexnet_errors`.

Each file says where its numbers come from.
"""
