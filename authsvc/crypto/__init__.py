"""crypto layer of the authsvc server."""
