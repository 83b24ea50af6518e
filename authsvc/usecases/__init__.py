"""The use-case layer: every rule of authsvc, reached the same way by the RPCs, the CLI and the
scheduler.

Nothing here imports gRPC. A use case takes plain values (and an `Origin` that says who asks),
raises the errors of `authsvc.errors`, and returns records or small result types; the servicer
(`authsvc.server.servicer`) only translates proto <-> these and errors -> status, in one place.
One module per domain: logins (and the login batch that settles them), tokens, revocation,
services, secrets, signing keys, callers (the admin and follower checks), audit.
"""
