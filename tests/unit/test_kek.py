"""KeyEncryptionKey: wrapping round trips, opaque failures, weak keys refused, nothing leaks."""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from authsvc.crypto.kek import (
    KekRing,
    KeyEncryptionKey,
    UnknownKek,
    load_private_key,
    serialize_private_key,
)
from authsvc.errors import DecryptError


@pytest.fixture(scope="module")
def private_key() -> RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def kek_text() -> str:
    return KeyEncryptionKey.generate_base64()


@pytest.fixture(scope="module")
def kek(kek_text: str) -> KeyEncryptionKey:
    return KeyEncryptionKey.from_base64(kek_text)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class TestWrap:
    def test_round_trip(self, kek: KeyEncryptionKey) -> None:
        blob = kek.wrap(b"private key bytes", kid="k1")
        assert kek.unwrap(blob, kid="k1") == b"private key bytes"

    def test_private_key_round_trip(
        self, kek: KeyEncryptionKey, private_key: RSAPrivateKey
    ) -> None:
        blob = kek.wrap(serialize_private_key(private_key), kid="k1")
        loaded = load_private_key(kek.unwrap(blob, kid="k1"))
        assert loaded.private_numbers() == private_key.private_numbers()

    def test_blob_layout_and_fresh_nonces(self, kek: KeyEncryptionKey) -> None:
        first, second = kek.wrap(b"same", kid="k1"), kek.wrap(b"same", kid="k1")
        assert first != second
        assert first[0] == 1 and len(first) == 1 + 12 + len(b"same") + 16
        assert first[1:13] != second[1:13]
        assert b"same" not in first

    def test_wrong_kid_fails_opaquely(self, kek: KeyEncryptionKey) -> None:
        blob = kek.wrap(b"secret", kid="k1")
        with pytest.raises(DecryptError) as info:
            kek.unwrap(blob, kid="k2")
        assert str(info.value) == "decryption failed"

    def test_wrong_kek_fails_opaquely(self, kek: KeyEncryptionKey) -> None:
        other = KeyEncryptionKey.from_base64(KeyEncryptionKey.generate_base64())
        with pytest.raises(DecryptError) as info:
            other.unwrap(kek.wrap(b"secret", kid="k1"), kid="k1")
        assert str(info.value) == "decryption failed"

    @pytest.mark.parametrize("position", [0, 1, 12, 13, -17, -1])
    def test_any_tampered_byte_fails(self, kek: KeyEncryptionKey, position: int) -> None:
        blob = bytearray(kek.wrap(b"secret material", kid="k1"))
        blob[position] ^= 0x01
        with pytest.raises(DecryptError):
            kek.unwrap(bytes(blob), kid="k1")

    @pytest.mark.parametrize("length", [0, 1, 13, 28])
    def test_truncated_blob_fails(self, kek: KeyEncryptionKey, length: int) -> None:
        blob = kek.wrap(b"secret material", kid="k1")
        with pytest.raises(DecryptError):
            kek.unwrap(blob[:length], kid="k1")

    def test_derive_gives_independent_subkeys(self, kek: KeyEncryptionKey, kek_text: str) -> None:
        a, b = kek.derive(b"secret-hash"), kek.derive(b"other")
        assert len(a) == 32 and a != b
        assert a == KeyEncryptionKey.from_base64(kek_text).derive(b"secret-hash")
        assert a != base64.b64decode(kek_text)


class TestConstruction:
    def test_generated_keys_are_accepted_and_distinct(self) -> None:
        texts = {KeyEncryptionKey.generate_base64() for _ in range(5)}
        assert len(texts) == 5
        for text in texts:
            assert len(base64.b64decode(text)) == 32
            KeyEncryptionKey.from_base64(text)

    def test_surrounding_whitespace_is_ignored(self, kek_text: str) -> None:
        KeyEncryptionKey.from_base64(f"  {kek_text}\n")

    @pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
    def test_raw_key_must_be_32_bytes(self, length: int) -> None:
        raw = os.urandom(length)
        with pytest.raises(ValueError) as info:
            KeyEncryptionKey(raw)
        if raw:
            assert raw.hex()[:16] not in str(info.value)

    @pytest.mark.parametrize(
        "text",
        ["", "not base64 at all!", b64(os.urandom(16)), b64(os.urandom(48)), "AAAA*AAA"],
    )
    def test_not_base64_of_32_bytes_is_refused(self, text: str) -> None:
        with pytest.raises(ValueError) as info:
            KeyEncryptionKey.from_base64(text)
        if text:
            assert text not in str(info.value)

    @pytest.mark.parametrize(
        "weak",
        [
            b64(bytes(32)),
            b64(b"\xff" * 32),
            b64(bytes(range(32))),
            b64(bytes(range(255, 223, -1))),
            b64(bytes(range(0, 64, 2))),
            b64(os.urandom(8) * 4),
            b64(os.urandom(16) * 2),
            b64(b"changeme" * 4),
            b64(b"my-super-secret-kek-for-authsvc!"),
            b64(b"0123456789abcdef0123456789abcdef"),
            "0" * 43 + "=",
            "A" * 43 + "=",
            "CHANGEME" + b64(os.urandom(32))[8:],
            "changeme" + b64(os.urandom(32))[8:],
        ],
    )
    def test_weak_or_placeholder_keys_are_refused(self, weak: str) -> None:
        assert len(base64.b64decode(weak)) == 32
        with pytest.raises(ValueError) as info:
            KeyEncryptionKey.from_base64(weak)
        message = str(info.value)
        assert message.startswith("AUTHSVC_KEK looks like a placeholder")
        assert weak not in message and weak[:12] not in message

    def test_repr_and_str_hide_the_key(self, kek: KeyEncryptionKey, kek_text: str) -> None:
        raw = base64.b64decode(kek_text)
        for shown in (repr(kek), str(kek), f"{kek}", repr([kek])):
            assert kek_text not in shown and raw.hex() not in shown and kek_text[:8] not in shown
            assert "redacted" in shown


class TestPrivateKeySerialisation:
    def test_serialised_as_pkcs8_der(self, private_key: RSAPrivateKey) -> None:
        der = serialize_private_key(private_key)
        assert der[:1] == b"\x30"  # a DER SEQUENCE
        assert load_private_key(der).key_size == 2048

    def test_garbage_is_refused_without_detail(self) -> None:
        garbage = os.urandom(64)
        with pytest.raises(ValueError) as info:
            load_private_key(garbage)
        assert garbage.hex()[:16] not in str(info.value)


class TestKekIdAndRing:
    def test_kek_id_is_stable_per_key_and_tells_nothing_of_it(self, kek_text: str) -> None:
        one, again = KeyEncryptionKey.from_base64(kek_text), KeyEncryptionKey.from_base64(kek_text)
        other = KeyEncryptionKey(os.urandom(32))
        assert one.kek_id == again.kek_id != other.kek_id
        assert len(one.kek_id) == 16
        assert one.kek_id not in base64.b64decode(kek_text).hex()

    def test_named_wrapping_is_bound_to_its_name_and_apart_from_kids(
        self, kek: KeyEncryptionKey
    ) -> None:
        blob = kek.wrap_named(b"k" * 32, name="secret-hash")
        assert kek.unwrap_named(blob, name="secret-hash") == b"k" * 32
        with pytest.raises(DecryptError):
            kek.unwrap_named(blob, name="other")
        with pytest.raises(DecryptError):
            kek.unwrap(blob, kid="secret-hash")

    def test_ring_unwraps_by_kek_id_and_refuses_an_unknown_one(
        self, kek: KeyEncryptionKey
    ) -> None:
        old = KeyEncryptionKey(os.urandom(32))
        ring = KekRing(kek, old)
        assert ring.primary is kek and ring.keks == (kek, old)
        blob = old.wrap(b"der", kid="k1")
        assert ring.unwrap(blob, kid="k1", kek_id=old.kek_id) == b"der"
        assert ring.unwrap(blob, kid="k1", kek_id=None) == b"der"  # a row without a kek id
        with pytest.raises(UnknownKek):
            KekRing(kek).unwrap(blob, kid="k1", kek_id=old.kek_id)
        with pytest.raises(DecryptError):
            KekRing(kek).unwrap(blob, kid="k1", kek_id=None)
        with pytest.raises(DecryptError):
            ring.unwrap(blob, kid="k1", kek_id=kek.kek_id)  # named wrongly: still opaque
        assert "redacted" in repr(ring)
