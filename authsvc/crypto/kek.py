"""Key-encryption key: AES-256-GCM wrapping of signing keys at rest, with the kid bound as AAD."""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from authsvc.errors import DecryptError

__all__ = [
    "KEY_BYTES",
    "KekRing",
    "KeyEncryptionKey",
    "UnknownKek",
    "load_private_key",
    "serialize_private_key",
]

KEY_BYTES = 32
_VERSION = b"\x01"
_NONCE_BYTES = 12  # 96 bits, the size GCM is defined for (NIST SP 800-38D section 5.2.1.1)
_TAG_BYTES = 16
_AAD_PREFIX = b"authsvc/signing-key/"
# Key material other than signing keys (the secret-hash key), bound to its name.
_NAMED_AAD_PREFIX = b"authsvc/wrapped-key/"
_KEK_ID_PURPOSE = b"authsvc/kek-id/v1"
_KEK_ID_BYTES = 8
# Words that mark a value copied from an example instead of generated.
_PLACEHOLDER_WORDS = (
    "changeme", "change_me", "change-me", "replace", "placeholder", "example",
    "secret", "password", "insecure", "dummy", "xxxxxxxx",
)
_WEAK_KEY = (
    "AUTHSVC_KEK looks like a placeholder or a weak key; generate a random one with "
    "`python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'`"
)


def _looks_weak(text: str, key: bytes) -> bool:
    """Patterns a random 32-byte key shows with negligible probability (well below 2**-40)."""
    lowered = text.lower()
    if any(word in lowered for word in _PLACEHOLDER_WORDS):
        return True
    # Printable ASCII throughout: a passphrase, base64-encoded (random: (95/256)**32 ~ 2**-46).
    if all(0x20 <= b < 0x7F for b in key):
        return True
    # Few distinct bytes: all zero, all equal, "0000..." or "AAAA..." text, short repeats.
    if len(set(key)) < 16:
        return True
    # Arithmetic sequences such as 00 01 02 ... or ff fe fd ...
    step = (key[1] - key[0]) % 256
    if all((key[i + 1] - key[i]) % 256 == step for i in range(len(key) - 1)):
        return True
    # A block repeated (period up to half the key).
    return any(key == (key[:period] * (KEY_BYTES // period + 1))[:KEY_BYTES]
               for period in range(1, KEY_BYTES // 2 + 1))


class KeyEncryptionKey:
    """The key that encrypts signing keys at rest (AES-256-GCM).

    Each blob is version byte + 96-bit random nonce + ciphertext and tag. The AAD binds the
    kid, so a wrapped key copied onto another key's row does not decrypt. Every failure to
    unwrap is the same opaque DecryptError (Fernet's InvalidToken). The key never appears in
    repr, str or an error message.
    """

    __slots__ = ("_aead", "_key", "kek_id")

    def __init__(self, key: bytes) -> None:
        """Use 32 raw key bytes (from_base64 is the checked way in from configuration).

        Raises:
            ValueError: key is not exactly 32 bytes.
        """
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"a key-encryption key must be exactly {KEY_BYTES} bytes")
        self._key = key
        self._aead = AESGCM(key)
        # A check value stored beside what this key wraps, so a server can tell which KEK wraps
        # what without trying to decrypt; an HKDF output, so it tells nothing about the key.
        self.kek_id = self.derive(_KEK_ID_PURPOSE)[:_KEK_ID_BYTES].hex()

    @classmethod
    def from_base64(cls, text: str, *, name: str = "AUTHSVC_KEK") -> KeyEncryptionKey:
        """Read the base64 text of AUTHSVC_KEK / AUTHSVC_KEK_FILE (surrounding whitespace ignored).

        `name` is the variable the text came from, for the message.

        Raises:
            ValueError: not strict base64, not 32 bytes, or an obviously weak or placeholder
                value. The message never contains the value.
        """
        stripped = text.strip()
        try:
            key = base64.b64decode(stripped, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{name} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"{name} must be the base64 of exactly {KEY_BYTES} bytes")
        if _looks_weak(stripped, key):
            raise ValueError(_WEAK_KEY.replace("AUTHSVC_KEK", name, 1))
        return cls(key)

    @staticmethod
    def generate_base64() -> str:
        """A fresh random key as base64 text, as AUTHSVC_KEK expects."""
        while True:
            key = os.urandom(KEY_BYTES)
            text = base64.b64encode(key).decode("ascii")
            if not _looks_weak(text, key):  # practically always on the first draw
                return text

    def __repr__(self) -> str:
        return "KeyEncryptionKey(<redacted>)"

    __str__ = __repr__

    def wrap(self, plaintext: bytes, *, kid: str) -> bytes:
        return self._wrap(plaintext, _aad(kid))

    def unwrap(self, blob: bytes, *, kid: str) -> bytes:
        """Decrypt a blob made by wrap() for the same kid.

        Raises:
            DecryptError: wrong KEK, wrong kid, or tampered or truncated blob; always the same.
        """
        return self._unwrap(blob, _aad(kid))

    def wrap_named(self, plaintext: bytes, *, name: str) -> bytes:
        """Wrap key material that is not a signing key (AAD = its name, apart from any kid)."""
        return self._wrap(plaintext, _NAMED_AAD_PREFIX + name.encode("utf-8"))

    def unwrap_named(self, blob: bytes, *, name: str) -> bytes:
        """Decrypt what wrap_named() wrapped under the same name; DecryptError as unwrap()."""
        return self._unwrap(blob, _NAMED_AAD_PREFIX + name.encode("utf-8"))

    def _wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def _unwrap(self, blob: bytes, aad: bytes) -> bytes:
        try:
            if blob[:1] != _VERSION or len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES:
                raise DecryptError
            nonce = blob[1 : 1 + _NONCE_BYTES]
            return self._aead.decrypt(nonce, blob[1 + _NONCE_BYTES :], aad)
        except Exception:
            raise DecryptError from None

    def derive(self, purpose: bytes) -> bytes:
        """A 32-byte subkey for another use (HKDF-SHA256, RFC 5869; info = purpose), so the
        KEK itself only ever keys AES-GCM."""
        if not purpose:
            raise ValueError("purpose is required")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(self._key)


class UnknownKek(DecryptError):
    """Data is wrapped under a KEK this process was not given (told apart by its kek id).

    As opaque as any DecryptError; callers that know the context say what to fix
    (authsvc.keys.wrapping names the variables).
    """


class KekRing:
    """The KEKs one process holds: AUTHSVC_KEK and, during a roll, AUTHSVC_KEK_PREVIOUS.

    MultiFernet's shape, except that the database, not the order here, says which KEK wraps new
    data (Repository.fetch_wrapping_kek_id): a replica restarted with the new KEK before
    `authsvc kek rotate` ran keeps wrapping under the old one, which replicas not yet restarted
    still read. Any held KEK unwraps, chosen by the kek id stored beside the blob.
    """

    __slots__ = ("_by_id", "primary")

    def __init__(self, primary: KeyEncryptionKey, *others: KeyEncryptionKey) -> None:
        self.primary = primary
        self._by_id = {k.kek_id: k for k in (*reversed(others), primary)}

    def __repr__(self) -> str:
        return f"KekRing(<{len(self._by_id)} redacted>)"

    @property
    def kek_ids(self) -> frozenset[str]:
        return frozenset(self._by_id)

    @property
    def keks(self) -> tuple[KeyEncryptionKey, ...]:
        """The primary first, then the previous ones."""
        return tuple(reversed(self._by_id.values()))

    def get(self, kek_id: str) -> KeyEncryptionKey:
        """Raises UnknownKek when no held KEK has this id."""
        kek = self._by_id.get(kek_id)
        if kek is None:
            raise UnknownKek
        return kek

    def unwrap(self, blob: bytes, *, kid: str, kek_id: str | None) -> bytes:
        """Unwrap with the KEK named by `kek_id`; None (a row written without one) tries each.

        Raises:
            DecryptError: no held KEK decrypts it (UnknownKek when `kek_id` names none held).
        """
        if kek_id is not None:
            return self.get(kek_id).unwrap(blob, kid=kid)
        for kek in self._by_id.values():
            try:
                return kek.unwrap(blob, kid=kid)
            except DecryptError:
                continue
        raise DecryptError


def _aad(kid: str) -> bytes:
    return _AAD_PREFIX + kid.encode("utf-8")


def serialize_private_key(key: RSAPrivateKey) -> bytes:
    """PKCS#8 DER, unencrypted: only ever stored after KeyEncryptionKey.wrap."""
    return key.private_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def load_private_key(der: bytes) -> RSAPrivateKey:
    """Read what serialize_private_key wrote, once unwrapped.

    Raises:
        ValueError: not an unencrypted PKCS#8 DER RSA private key (no detail about its bytes).
    """
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError):
        raise ValueError("not a PKCS#8 DER private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key
