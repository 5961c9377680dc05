"""Post-processing of surface probabilities (Z, Y, X) into bool masks (its tuning: :mod:`vesuvius_monai.tuning`).

- :mod:`~vesuvius_monai.postprocess.operators` (and :mod:`~vesuvius_monai.postprocess.patching`): one pure
  function per operator;
- :mod:`~vesuvius_monai.postprocess.chain`: :func:`postprocess` runs them in one order (see there);
- :mod:`~vesuvius_monai.postprocess.blockwise`: the chain on a Zarr probability store larger than memory.
"""

from vesuvius_monai.config import PostprocessConfig
from vesuvius_monai.postprocess.chain import postprocess
from vesuvius_monai.postprocess.operators import fill_small_holes, remove_small_components

__all__ = ["PostprocessConfig", "fill_small_holes", "postprocess", "remove_small_components"]
