"""The installed editkit version (a leaf module, so core modules need not import the package)."""

__version__ = "0.1.0"
