"""Who may call what: the admin check and the revocation follower's check, each once.

Both take the bearer token the transport found (`authsvc_client.interceptors.bearer_token`,
the one parser) or None when the call carried none, and the thumbprint of the call's verified
client certificate ("" without one: a token issued over mTLS is bound to that certificate), and
verify it with the same verifier as ValidateToken, against authsvc's own audience.
"""

from __future__ import annotations

from authsvc.config import Settings
from authsvc.errors import PermissionDenied, Unauthenticated
from authsvc_client.claims import ADMIN_SCOPE, Claims
from authsvc_client.v1 import auth_pb2
from authsvc_client.verifier import TokenVerifier

__all__ = ["Callers"]


class Callers:
    def __init__(self, settings: Settings, verifier: TokenVerifier) -> None:
        self._s = settings
        self._verifier = verifier

    def admin(self, token: str | None, thumbprint: str = "") -> Claims:
        """The claims of an admin token: audience authsvc, scope authsvc.admin.

        Raises:
            Unauthenticated: no token, or one that does not validate.
            PermissionDenied: a valid token without the admin scope.
        """
        if token is None:
            raise Unauthenticated("this call needs an admin bearer token")
        if len(token) > self._s.max_token_bytes:
            raise Unauthenticated("admin token rejected: MALFORMED")
        result = self._verifier.verify(
            token,
            audience=self._s.admin_audience,
            required_scopes=(ADMIN_SCOPE,),
            client_cert_thumbprint=thumbprint or None,
        )
        if result.valid and result.claims is not None:
            return result.claims
        if result.reason == auth_pb2.INSUFFICIENT_SCOPE:
            raise PermissionDenied(f"this call needs scope {ADMIN_SCOPE}")
        raise Unauthenticated(f"admin token rejected: {result.reason_name}")

    def follower(self, token: str | None, thumbprint: str = "") -> Claims:
        """A registered service following revocations: a token for the server's own audience,
        scopes or none (IssueToken gives one to any enabled service), or an admin token.

        Raises:
            Unauthenticated: no token, or one that does not validate for authsvc.
        """
        if token is None:
            raise Unauthenticated(
                f"WatchRevocations needs a bearer token for audience {self._s.admin_audience}"
            )
        if len(token) > self._s.max_token_bytes:
            raise Unauthenticated("follower token rejected: MALFORMED")
        result = self._verifier.verify(
            token, audience=self._s.admin_audience, client_cert_thumbprint=thumbprint or None
        )
        if result.valid and result.claims is not None:
            return result.claims
        raise Unauthenticated(f"follower token rejected: {result.reason_name}")
