"""authsvc server: service-to-service authentication over gRPC."""

__version__ = "0.1.0"
