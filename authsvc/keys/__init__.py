"""keys layer of the authsvc server."""
