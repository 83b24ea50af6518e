"""tokens layer of the authsvc server."""
