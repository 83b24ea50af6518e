"""server layer of the authsvc server."""
