"""The package version (also in pyproject.toml), in a module of its own so that the package's parts
can read it without importing ``dp360rt`` itself."""
__version__ = "0.1.0"
