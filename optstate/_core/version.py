"""The package version, in one place (``optstate.__version__``, checkpoint sidecars)."""

__version__ = "0.1.0"
