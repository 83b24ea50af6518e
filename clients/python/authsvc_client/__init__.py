"""authsvc client: generated stubs, token sources, call credentials and server interceptors."""

__version__ = "0.1.0"

__all__ = ["__version__"]
