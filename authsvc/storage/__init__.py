"""storage layer of the authsvc server."""
