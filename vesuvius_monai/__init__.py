"""vesuvius_monai: 3D papyrus-surface detection for Vesuvius Challenge scroll CT, built on MONAI."""

__version__ = "0.1.0"
