"""meshpar: train transformers too large for one device."""

__version__ = "0.1.0"
