"""Post-processing of surface probabilities (Z, Y, X) into bool masks, and its tuning on validation fragments.

- :mod:`~vesuvius_monai.postprocess.operators` (and :mod:`~vesuvius_monai.postprocess.patching`): one pure
  function per operator;
- :mod:`~vesuvius_monai.postprocess.chain`: :func:`postprocess` runs them in one order (see there);
- :mod:`~vesuvius_monai.postprocess.blockwise`: the chain on a Zarr probability store larger than memory;
- :mod:`~vesuvius_monai.postprocess.search`: :func:`pick_postprocess` (``tune-postprocess``).
"""

from vesuvius_monai.config import PostprocessConfig
from vesuvius_monai.postprocess.chain import postprocess
from vesuvius_monai.postprocess.operators import fill_small_holes, remove_small_components
from vesuvius_monai.postprocess.search import PostprocessChoice, Scorer, Search, describe, pick_postprocess

__all__ = ["PostprocessChoice", "PostprocessConfig", "Scorer", "Search", "describe", "fill_small_holes",
           "pick_postprocess", "postprocess", "remove_small_components"]
