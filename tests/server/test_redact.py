"""PII redaction: what the default detectors catch and keep, extra patterns, and that the
cheap gates in front of the detectors never change what is redacted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perennial_server import redact
from perennial_server.redact import Redactor, iban_ok, luhn_ok


@pytest.mark.parametrize("text,marker", [
    ("write to john.doe+work@mail.example.co.uk now", "email"),
    ("call +44 20 7946 0958 today", "phone"),
    ("call (415) 555-0134", "phone"),
    ("card 4111-1111-1111-1111 ok", "card"),
    ("card 5500 0000 0000 0004", "card"),
    ("iban GB82 WEST 1234 5698 7654 32", "iban"),
    ("iban DE89370400440532013000", "iban"),
    ("from 10.0.12.7 port", "ipv4"),
    ("from 2001:db8:85a3::8a2e:370:7334 ok", "ipv6"),
])
def test_redacts_default_pii(text: str, marker: str) -> None:
    out = Redactor().text(text)
    assert f"[REDACTED:{marker}]" in out, out


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 fails Luhn",  # (and is too long for a phone)
    "on 2024-01-15 at 12:30:45 we sold 1234567 items",
    "version 1.2.3 of std::vector, answer 42",
])
def test_keeps_what_is_not_pii(text: str) -> None:
    assert Redactor().text(text) == text


def test_extra_patterns_and_disabled() -> None:
    r = Redactor.from_config(True, '[{"name": "employee-id", "regex": "EMP-\\\\d{6}"}]')
    assert r.text("ask EMP-123456") == "ask [REDACTED:employee-id]"
    assert r.value({"a": ["EMP-000001", 3]}) == {"a": ["[REDACTED:employee-id]", 3]}
    assert r.value({"EMP-000002": {"to": "a@b.example"}, 7: "x"}) == {"[REDACTED:employee-id]": {"to": "[REDACTED:email]"}, 7: "x"}
    assert Redactor(enabled=False).text("a@b.example") == "a@b.example"
    with pytest.raises(ValueError):
        Redactor.from_config(True, '[{"name": "x"}]')
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB83WEST12345698765432")


def ungated(s: str) -> str:
    """The default detectors, every one run on the whole text (what the gates must agree with)."""
    s = redact._EMAIL.sub("[REDACTED:email]", s)
    s = redact._IPV6.sub(redact._ipv6, s)
    s = redact._CARD.sub(redact._card, s)
    s = redact._IBAN.sub(redact._iban, s)
    s = redact._IPV4.sub("[REDACTED:ipv4]", s)
    return redact._PHONE.sub(redact._phone, s)


# text made mostly of what the detectors look at: ASCII and Unicode digits and spaces, separators,
# capitals, hex, @ and dots, accented letters
PII_ALPHABET = st.sampled_from(list("0123456789012345 -.()+:@ABCDEFGHXYZabcdefxyz\t\n\x1c\u00a0\u2009\u0663\uff13\u00e9\U0001d7d9"))
PII_TEXT = st.one_of(
    st.text(PII_ALPHABET, max_size=60),
    st.lists(st.sampled_from(["4111 1111 1111 1111", "GB82 WEST 1234 5698 7654 32", "10.0.12.7", "2001:db8::1", "+44 20 7946 0958",
                              "(415) 555-0134", "555 0134", "555-013", "4111-1111-1111-1111", "5500 0000 0000 0004",
                              "DE89370400440532013000", "4222222222222", "1.2.3.4", "1", "12", "123", ".", "-", "a.b@example.com", "\u0664\u0661\u0665 \u0665\u0665\u0665 \u0660\u0661\u0663\u0664", " ", "x", "2024", "::"]),
             max_size=8).map("".join),
    st.text(max_size=40),
)


@settings(max_examples=600, deadline=None)
@given(PII_TEXT)
def test_gates_never_change_what_is_redacted(text: str) -> None:
    assert Redactor().text(text) == ungated(text)


class _MustNotRun:
    def __init__(self, name: str) -> None:
        self.name = name

    def sub(self, *_a: object, **_k: object) -> str:
        raise AssertionError(f"detector {self.name} ran although its gate is closed")


def test_gates_skip_detectors_on_long_text_without_pii(monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = "You are a helpful assistant for ACME Corp. Orders from 2024 ship in 3 to 5 days: ask us. " * 25
    expected = ungated(prompt + "Call +1 415 555 0134.")
    for name in ("_EMAIL", "_IPV6", "_CARD", "_IBAN", "_IPV4"):
        monkeypatch.setattr(redact, name, _MustNotRun(name))
    assert Redactor().text(prompt) == prompt  # no detector ran
    # only the phone detector's gate opens for a phone number
    assert Redactor().text(prompt + "Call +1 415 555 0134.") == expected
    assert expected.endswith("Call [REDACTED:phone].")
    monkeypatch.setattr(redact, "_PHONE", _MustNotRun("_PHONE"))
    assert Redactor().text(prompt) == prompt
