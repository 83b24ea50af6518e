"""Service secrets: 256-bit, prefixed, keyed hashes, constant-time verification."""

from __future__ import annotations

import base64
import os

import pytest

from authsvc.crypto.secrets import SECRET_PREFIX, SecretHasher, mint_secret


@pytest.fixture(scope="module")
def hasher_key() -> bytes:
    return os.urandom(32)


@pytest.fixture(scope="module")
def hasher(hasher_key: bytes) -> SecretHasher:
    return SecretHasher(hasher_key)


class TestMintSecret:
    def test_prefix_and_256_bits(self) -> None:
        secret = mint_secret()
        assert secret.startswith(SECRET_PREFIX) and SECRET_PREFIX == "asvcs_"
        body = secret[len(SECRET_PREFIX) :]
        assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) == 32

    def test_every_secret_is_new(self) -> None:
        assert len({mint_secret() for _ in range(200)}) == 200


class TestSecretHasher:
    def test_verify_accepts_the_secret_and_nothing_else(self, hasher: SecretHasher) -> None:
        secret = mint_secret()
        stored = hasher.hash(secret)
        assert len(stored) == 32
        assert hasher.verify(secret, stored)
        assert not hasher.verify(mint_secret(), stored)
        assert not hasher.verify(secret[:-1], stored)
        assert not hasher.verify(secret, stored[:-1])
        assert not hasher.verify("", stored)

    def test_one_hash_per_secret(self, hasher: SecretHasher) -> None:
        secret = mint_secret()
        assert hasher.hash(secret) == hasher.hash(secret)
        assert hasher.hash(secret) != hasher.hash(mint_secret())

    def test_hash_depends_on_the_key(self, hasher: SecretHasher) -> None:
        secret = mint_secret()
        assert SecretHasher(os.urandom(32)).hash(secret) != hasher.hash(secret)

    def test_the_stored_hash_is_not_the_secret(self, hasher: SecretHasher) -> None:
        secret = mint_secret()
        assert secret.encode() not in hasher.hash(secret)

    def test_malformed_input_does_not_raise(self, hasher: SecretHasher) -> None:
        stored = hasher.hash(mint_secret())
        assert not hasher.verify("\ud800", stored)
        assert len(hasher.hash("\ud800")) == 32

    def test_short_key_is_refused(self) -> None:
        with pytest.raises(ValueError):
            SecretHasher(b"short")

    def test_repr_hides_the_key(self, hasher: SecretHasher, hasher_key: bytes) -> None:
        assert hasher_key.hex() not in repr(hasher) and "redacted" in repr(hasher)
