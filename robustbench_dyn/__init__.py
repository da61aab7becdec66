"""dynrobust: is this convolution robust?

Corruption engine, ImageNet-C evaluation and spectrum analysis for dynamic convolutions
(Bi-volution, DDF, involution, DCDC, ODConv) next to static baselines.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dynrobust")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
