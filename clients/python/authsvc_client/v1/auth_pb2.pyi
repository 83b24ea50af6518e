import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValidationFailure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALIDATION_FAILURE_UNSPECIFIED: _ClassVar[ValidationFailure]
    MALFORMED: _ClassVar[ValidationFailure]
    BAD_SIGNATURE: _ClassVar[ValidationFailure]
    UNKNOWN_KEY: _ClassVar[ValidationFailure]
    EXPIRED: _ClassVar[ValidationFailure]
    NOT_YET_VALID: _ClassVar[ValidationFailure]
    WRONG_ISSUER: _ClassVar[ValidationFailure]
    WRONG_AUDIENCE: _ClassVar[ValidationFailure]
    REVOKED: _ClassVar[ValidationFailure]
    INSUFFICIENT_SCOPE: _ClassVar[ValidationFailure]
    SERVICE_DISABLED: _ClassVar[ValidationFailure]
    CERTIFICATE_MISMATCH: _ClassVar[ValidationFailure]

class RevocationKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVOCATION_KIND_UNSPECIFIED: _ClassVar[RevocationKind]
    REVOCATION_KIND_TOKEN: _ClassVar[RevocationKind]
    REVOCATION_KIND_SERVICE_TOKENS: _ClassVar[RevocationKind]
    REVOCATION_KIND_SERVICE_DISABLED: _ClassVar[RevocationKind]
VALIDATION_FAILURE_UNSPECIFIED: ValidationFailure
MALFORMED: ValidationFailure
BAD_SIGNATURE: ValidationFailure
UNKNOWN_KEY: ValidationFailure
EXPIRED: ValidationFailure
NOT_YET_VALID: ValidationFailure
WRONG_ISSUER: ValidationFailure
WRONG_AUDIENCE: ValidationFailure
REVOKED: ValidationFailure
INSUFFICIENT_SCOPE: ValidationFailure
SERVICE_DISABLED: ValidationFailure
CERTIFICATE_MISMATCH: ValidationFailure
REVOCATION_KIND_UNSPECIFIED: RevocationKind
REVOCATION_KIND_TOKEN: RevocationKind
REVOCATION_KIND_SERVICE_TOKENS: RevocationKind
REVOCATION_KIND_SERVICE_DISABLED: RevocationKind

class IssueTokenRequest(_message.Message):
    __slots__ = ("service_id", "service_secret", "audience", "scopes", "ttl_seconds", "client_assertion")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_SECRET_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ASSERTION_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    service_secret: str
    audience: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    client_assertion: str
    def __init__(self, service_id: _Optional[str] = ..., service_secret: _Optional[str] = ..., audience: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., client_assertion: _Optional[str] = ...) -> None: ...

class ExchangeTokenRequest(_message.Message):
    __slots__ = ("subject_token", "subject_token_type", "audience", "scopes", "ttl_seconds", "service_id", "service_secret", "client_assertion")
    SUBJECT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_SECRET_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ASSERTION_FIELD_NUMBER: _ClassVar[int]
    subject_token: str
    subject_token_type: str
    audience: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    service_id: str
    service_secret: str
    client_assertion: str
    def __init__(self, subject_token: _Optional[str] = ..., subject_token_type: _Optional[str] = ..., audience: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., service_id: _Optional[str] = ..., service_secret: _Optional[str] = ..., client_assertion: _Optional[str] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("access_token", "token_type", "expires_in", "expires_at", "key_id", "scopes", "issued_token_type")
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    access_token: str
    token_type: str
    expires_in: int
    expires_at: _timestamp_pb2.Timestamp
    key_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    issued_token_type: str
    def __init__(self, access_token: _Optional[str] = ..., token_type: _Optional[str] = ..., expires_in: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., issued_token_type: _Optional[str] = ...) -> None: ...

class ValidateTokenRequest(_message.Message):
    __slots__ = ("token", "audience", "required_scopes", "client_cert_thumbprint")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERT_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    token: str
    audience: str
    required_scopes: _containers.RepeatedScalarFieldContainer[str]
    client_cert_thumbprint: str
    def __init__(self, token: _Optional[str] = ..., audience: _Optional[str] = ..., required_scopes: _Optional[_Iterable[str]] = ..., client_cert_thumbprint: _Optional[str] = ...) -> None: ...

class Claims(_message.Message):
    __slots__ = ("issuer", "subject", "audience", "scopes", "issued_at", "expires_at", "jti", "key_id", "not_before", "client_id", "cert_thumbprint", "actors")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CERT_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    ACTORS_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    subject: str
    audience: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    jti: str
    key_id: str
    not_before: _timestamp_pb2.Timestamp
    client_id: str
    cert_thumbprint: str
    actors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, issuer: _Optional[str] = ..., subject: _Optional[str] = ..., audience: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., jti: _Optional[str] = ..., key_id: _Optional[str] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., client_id: _Optional[str] = ..., cert_thumbprint: _Optional[str] = ..., actors: _Optional[_Iterable[str]] = ...) -> None: ...

class ValidateTokenResponse(_message.Message):
    __slots__ = ("valid", "reason", "claims")
    VALID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    reason: ValidationFailure
    claims: Claims
    def __init__(self, valid: _Optional[bool] = ..., reason: _Optional[_Union[ValidationFailure, str]] = ..., claims: _Optional[_Union[Claims, _Mapping]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("token", "jti", "service_id", "reason")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    token: str
    jti: str
    service_id: str
    reason: str
    def __init__(self, token: _Optional[str] = ..., jti: _Optional[str] = ..., service_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...

class RotateServiceSecretRequest(_message.Message):
    __slots__ = ("service_id", "current_secret", "grace_period_seconds")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_SECRET_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    current_secret: str
    grace_period_seconds: int
    def __init__(self, service_id: _Optional[str] = ..., current_secret: _Optional[str] = ..., grace_period_seconds: _Optional[int] = ...) -> None: ...

class RotateServiceSecretResponse(_message.Message):
    __slots__ = ("service_secret", "previous_secret_expires_at")
    SERVICE_SECRET_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SECRET_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    service_secret: str
    previous_secret_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, service_secret: _Optional[str] = ..., previous_secret_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RotateSigningKeyRequest(_message.Message):
    __slots__ = ("revoke_previous",)
    REVOKE_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    revoke_previous: bool
    def __init__(self, revoke_previous: _Optional[bool] = ...) -> None: ...

class RotateSigningKeyResponse(_message.Message):
    __slots__ = ("key_id", "activated_at")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_AT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    activated_at: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., activated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetJwksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetJwksResponse(_message.Message):
    __slots__ = ("jwks_json",)
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    def __init__(self, jwks_json: _Optional[str] = ...) -> None: ...

class WatchRevocationsRequest(_message.Message):
    __slots__ = ("after_cursor",)
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    after_cursor: int
    def __init__(self, after_cursor: _Optional[int] = ...) -> None: ...

class RevocationEvent(_message.Message):
    __slots__ = ("cursor", "jti", "service_id", "revoked_before", "expires_at", "kind")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    JTI_FIELD_NUMBER: _ClassVar[int]
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    jti: str
    service_id: str
    revoked_before: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    kind: RevocationKind
    def __init__(self, cursor: _Optional[int] = ..., jti: _Optional[str] = ..., service_id: _Optional[str] = ..., revoked_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[RevocationKind, str]] = ...) -> None: ...

class Grant(_message.Message):
    __slots__ = ("audience", "scopes")
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    audience: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, audience: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("service_id", "audiences", "scopes", "disabled", "created_at", "grants", "has_secret", "public_key_ids", "tls_sans", "federated_subjects")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    HAS_SECRET_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    TLS_SANS_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    audiences: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    disabled: bool
    created_at: _timestamp_pb2.Timestamp
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    has_secret: bool
    public_key_ids: _containers.RepeatedScalarFieldContainer[str]
    tls_sans: _containers.RepeatedScalarFieldContainer[str]
    federated_subjects: _containers.RepeatedCompositeFieldContainer[FederatedSubject]
    def __init__(self, service_id: _Optional[str] = ..., audiences: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., disabled: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., has_secret: _Optional[bool] = ..., public_key_ids: _Optional[_Iterable[str]] = ..., tls_sans: _Optional[_Iterable[str]] = ..., federated_subjects: _Optional[_Iterable[_Union[FederatedSubject, _Mapping]]] = ...) -> None: ...

class FederatedSubject(_message.Message):
    __slots__ = ("trust", "subject")
    TRUST_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    trust: str
    subject: str
    def __init__(self, trust: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class CreateServiceRequest(_message.Message):
    __slots__ = ("service_id", "audiences", "scopes", "grants", "no_secret", "public_keys", "tls_sans", "federated_subjects")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    NO_SECRET_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    TLS_SANS_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    audiences: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    no_secret: bool
    public_keys: _containers.RepeatedScalarFieldContainer[str]
    tls_sans: _containers.RepeatedScalarFieldContainer[str]
    federated_subjects: _containers.RepeatedCompositeFieldContainer[FederatedSubject]
    def __init__(self, service_id: _Optional[str] = ..., audiences: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., no_secret: _Optional[bool] = ..., public_keys: _Optional[_Iterable[str]] = ..., tls_sans: _Optional[_Iterable[str]] = ..., federated_subjects: _Optional[_Iterable[_Union[FederatedSubject, _Mapping]]] = ...) -> None: ...

class CreateServiceResponse(_message.Message):
    __slots__ = ("service", "service_secret")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_SECRET_FIELD_NUMBER: _ClassVar[int]
    service: Service
    service_secret: str
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ..., service_secret: _Optional[str] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[Service]
    def __init__(self, services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ...) -> None: ...

class DisableServiceRequest(_message.Message):
    __slots__ = ("service_id",)
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    def __init__(self, service_id: _Optional[str] = ...) -> None: ...

class DisableServiceResponse(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: Service
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class UpdateServiceRequest(_message.Message):
    __slots__ = ("service_id", "add_audiences", "remove_audiences", "add_scopes", "remove_scopes", "grants", "revoke_grants", "add_public_keys", "remove_public_key_ids", "add_tls_sans", "remove_tls_sans", "add_federated_subjects", "remove_federated_subjects")
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ADD_AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    REMOVE_AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    ADD_SCOPES_FIELD_NUMBER: _ClassVar[int]
    REMOVE_SCOPES_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    REVOKE_GRANTS_FIELD_NUMBER: _ClassVar[int]
    ADD_PUBLIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_PUBLIC_KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    ADD_TLS_SANS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_TLS_SANS_FIELD_NUMBER: _ClassVar[int]
    ADD_FEDERATED_SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FEDERATED_SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    add_audiences: _containers.RepeatedScalarFieldContainer[str]
    remove_audiences: _containers.RepeatedScalarFieldContainer[str]
    add_scopes: _containers.RepeatedScalarFieldContainer[str]
    remove_scopes: _containers.RepeatedScalarFieldContainer[str]
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    revoke_grants: _containers.RepeatedCompositeFieldContainer[Grant]
    add_public_keys: _containers.RepeatedScalarFieldContainer[str]
    remove_public_key_ids: _containers.RepeatedScalarFieldContainer[str]
    add_tls_sans: _containers.RepeatedScalarFieldContainer[str]
    remove_tls_sans: _containers.RepeatedScalarFieldContainer[str]
    add_federated_subjects: _containers.RepeatedCompositeFieldContainer[FederatedSubject]
    remove_federated_subjects: _containers.RepeatedCompositeFieldContainer[FederatedSubject]
    def __init__(self, service_id: _Optional[str] = ..., add_audiences: _Optional[_Iterable[str]] = ..., remove_audiences: _Optional[_Iterable[str]] = ..., add_scopes: _Optional[_Iterable[str]] = ..., remove_scopes: _Optional[_Iterable[str]] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., revoke_grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., add_public_keys: _Optional[_Iterable[str]] = ..., remove_public_key_ids: _Optional[_Iterable[str]] = ..., add_tls_sans: _Optional[_Iterable[str]] = ..., remove_tls_sans: _Optional[_Iterable[str]] = ..., add_federated_subjects: _Optional[_Iterable[_Union[FederatedSubject, _Mapping]]] = ..., remove_federated_subjects: _Optional[_Iterable[_Union[FederatedSubject, _Mapping]]] = ...) -> None: ...

class UpdateServiceResponse(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: Service
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class EnableServiceRequest(_message.Message):
    __slots__ = ("service_id",)
    SERVICE_ID_FIELD_NUMBER: _ClassVar[int]
    service_id: str
    def __init__(self, service_id: _Optional[str] = ...) -> None: ...

class EnableServiceResponse(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: Service
    def __init__(self, service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class SigningKey(_message.Message):
    __slots__ = ("key_id", "state", "created_at", "activated_at", "retired_at", "publish_until")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_AT_FIELD_NUMBER: _ClassVar[int]
    RETIRED_AT_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_UNTIL_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    state: str
    created_at: _timestamp_pb2.Timestamp
    activated_at: _timestamp_pb2.Timestamp
    retired_at: _timestamp_pb2.Timestamp
    publish_until: _timestamp_pb2.Timestamp
    def __init__(self, key_id: _Optional[str] = ..., state: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., activated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., retired_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., publish_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListSigningKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSigningKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[SigningKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[SigningKey, _Mapping]]] = ...) -> None: ...
