"""Writers (NIfTI, Zarr), atomic file output and checkpoints."""
