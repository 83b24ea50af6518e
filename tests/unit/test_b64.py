"""base64url helpers: checking the canonical form directly must agree, on every input, with
the definition it replaced (decode, re-encode, compare; RFC 7515 section 2 and appendix C)."""

from __future__ import annotations

import base64
import binascii

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authsvc_client._b64 import b64url_decode, b64url_decode_canonical, b64url_encode_bytes

ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# What a respelled or damaged segment may hold besides the alphabet.
OTHER = b"+/= \t\n\r*.!%\x00\x7f\x80\xff"


def by_reencoding(text: bytes) -> bytes | None:
    """The definition, with the standard library only: the text is canonical when encoding what
    a lenient decoder reads from it gives the text back."""
    try:
        data = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if base64.urlsafe_b64encode(data).rstrip(b"=") == text else None


def agree(text: bytes) -> None:
    expected = by_reencoding(text)
    assert b64url_decode_canonical(text) == expected
    if expected is None:
        with pytest.raises(ValueError):
            b64url_decode(text)
    else:
        assert b64url_decode(text) == expected


class TestCanonicalDecoding:
    @given(data=st.binary(max_size=80))
    def test_every_encoding_decodes_to_its_bytes(self, data: bytes) -> None:
        encoded = b64url_encode_bytes(data)
        assert b64url_decode_canonical(encoded) == data
        assert b64url_decode(encoded.decode("ascii")) == data
        agree(encoded)

    @given(data=st.binary(min_size=1, max_size=40), last=st.sampled_from(ALPHABET))
    def test_any_last_character_agrees(self, data: bytes, last: int) -> None:
        # The trailing-bit rule: most replacements keep the same bytes but are not canonical.
        encoded = b64url_encode_bytes(data)
        agree(encoded[:-1] + bytes([last]))

    @given(
        data=st.binary(max_size=40),
        position=st.integers(min_value=0),
        insert=st.binary(min_size=1, max_size=3),
    )
    def test_encodings_with_bytes_inserted_agree(
        self, data: bytes, position: int, insert: bytes
    ) -> None:
        encoded = b64url_encode_bytes(data)
        at = position % (len(encoded) + 1)
        agree(encoded[:at] + insert + encoded[at:])

    @given(data=st.binary(min_size=1, max_size=40), cut=st.integers(min_value=1, max_value=3))
    def test_truncated_encodings_agree(self, data: bytes, cut: int) -> None:
        agree(b64url_encode_bytes(data)[:-cut])

    @given(data=st.binary(max_size=40))
    def test_padded_and_standard_alphabet_respellings_agree(self, data: bytes) -> None:
        standard = base64.b64encode(data)
        for text in (standard, standard.rstrip(b"="), base64.urlsafe_b64encode(data)):
            agree(text)

    @given(text=st.lists(st.sampled_from(ALPHABET + OTHER), max_size=24).map(bytes))
    def test_texts_over_alphabet_and_junk_agree(self, text: bytes) -> None:
        agree(text)

    @settings(max_examples=300)
    @given(text=st.binary(max_size=24))
    def test_arbitrary_bytes_agree(self, text: bytes) -> None:
        agree(text)

    def test_every_text_of_up_to_two_bytes_agrees(self) -> None:
        agree(b"")
        for first in range(256):
            agree(bytes([first]))
            for second in range(256):
                agree(bytes([first, second]))

    def test_every_last_character_of_three_agrees(self) -> None:
        for prefix in (b"AA", b"_-", b"zz"):
            for last in range(256):
                agree(prefix + bytes([last]))

    def test_non_ascii_text_is_refused(self) -> None:
        with pytest.raises(ValueError):
            b64url_decode("QUJD\u00e9")
        assert b64url_decode("QUJD") == b"ABC"
