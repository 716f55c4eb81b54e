"""PII redaction applied to captured text before anything touches disk.

Default detectors: e-mail addresses, card numbers (Luhn-checked), IBANs
(mod-97-checked), phone numbers, IPv4 and IPv6 addresses. Matches are replaced
by `[REDACTED:<name>]`. Extra patterns (name + Python regex) come from the
Deployment's `feedback.redaction.extraPatterns`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){1,5}(?![\w])")
_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{4}$")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:])")

# Gates: cheap necessary conditions checked before each detector. The detectors run in Python's
# regex engine at 20-90 ns per character each (a 2 KB system prompt cost ~0.4 ms to redact);
# a gate looks at the text's byte "shape" (one bytes.translate, ~1 ns per character): ASCII
# digits -> '0', A-Z -> 'A', ASCII whitespace and . - ( ) + kept, any other ASCII -> 'x', and
# every non-ASCII byte -> '0' (it may belong to a Unicode digit or space, which `\d`/`\s` match).
# A gate only skips a detector that could not have matched (property-tested against ungated runs).
def _shape_table() -> bytes:
    t = bytearray(b"x" * 256)
    t[0x80:] = b"0" * 128
    t[ord("0"):ord("9") + 1] = b"0" * 10
    t[ord("A"):ord("Z") + 1] = b"A" * 26
    for c in range(128):
        if chr(c).isspace() or chr(c) in ".-()+":
            t[c] = c
    return bytes(t)


_SHAPE = _shape_table()
_CARD_SEPARATORS = b" -"  # `[ -]` in _CARD
_PHONE_SEPARATORS = bytes(c for c in range(128) if chr(c).isspace()) + b".-()+"  # `[\s.-]`, `\+`, `\(`, `\)` in _PHONE
_CARD_GATE = b"0" * 13  # 13+ digits with at most single separators between them
_PHONE_GATE = b"0" * 7  # _phone() keeps anything with fewer than 7 digits
_IBAN_GATE = b"AA00"  # two capitals, then the two check digits
_IPV4_GATE = re.compile(rb"0\.0+\.0+\.0")
_IPV6_GATE = re.compile(r":[0-9A-Fa-f]{0,4}:")  # two colons at most 4 hex digits apart


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    s = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in s)) % 97 == 1
    except ValueError:
        return False


def _marker(name: str) -> str:
    return f"[REDACTED:{name}]"


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    if 13 <= len(digits) <= 19 and luhn_ok(digits):
        return _marker("card")
    return m.group(0)


def _iban(m: re.Match[str]) -> str:
    return _marker("iban") if iban_ok(m.group(0)) else m.group(0)


def _phone(m: re.Match[str]) -> str:
    text = m.group(0)
    n = sum(c.isdigit() for c in text)
    if n < 7 or n > 15 or _DATE.match(text):
        return text
    # a bare run of digits without separators or '+' is more often an id than a phone
    if text.isdigit() and n < 10:
        return text
    return _marker("phone")


def _ipv6(m: re.Match[str]) -> str:
    text = m.group(0)
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return _marker("ipv6")


@dataclass
class Redactor:
    enabled: bool = True
    extra: list[tuple[str, re.Pattern[str]]] = field(default_factory=list)

    @classmethod
    def from_config(cls, enabled: bool = True, extra_patterns: str | list[dict[str, str]] | None = None) -> "Redactor":
        """`extra_patterns`: JSON (or list) of `{"name": ..., "regex": ...}` as in `Redaction.extraPatterns`."""
        if isinstance(extra_patterns, str):
            extra_patterns = json.loads(extra_patterns) if extra_patterns.strip() else []
        extra = []
        for p in extra_patterns or []:
            if not isinstance(p, dict) or not p.get("name") or not p.get("regex"):
                raise ValueError("each extra redaction pattern must have `name` and `regex`")
            extra.append((str(p["name"]), re.compile(p["regex"])))
        return cls(enabled=enabled, extra=extra)

    def text(self, s: str) -> str:
        if not self.enabled or not s:
            return s
        for name, rx in self.extra:
            s = rx.sub(_marker(name), s)
        if "@" in s:
            s = _EMAIL.sub(_marker("email"), s)
        if ":" in s and _IPV6_GATE.search(s):
            s = _IPV6.sub(_ipv6, s)
        shape = s.encode("utf-8", "surrogatepass").translate(_SHAPE)
        if b"0" not in shape:
            return s
        # a marker has no run of digits or capitals+digits, so a replacement never opens a later
        # gate: the shape taken before them stays a necessary condition
        if _CARD_GATE in shape.translate(None, _CARD_SEPARATORS):
            s = _CARD.sub(_card, s)
        if _IBAN_GATE in shape:
            s = _IBAN.sub(_iban, s)
        if _IPV4_GATE.search(shape):
            s = _IPV4.sub(_marker("ipv4"), s)
        if _PHONE_GATE in shape.translate(None, _PHONE_SEPARATORS):
            s = _PHONE.sub(_phone, s)
        return s

    def value(self, v: Any) -> Any:
        """Redact every string inside a JSON-like value, dict keys included (free-form maps such
        as `metadata` are keyed by whatever the client chose; two keys redacted alike keep the last value)."""
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, list):
            return [self.value(x) for x in v]
        if isinstance(v, dict):
            return {(self.text(k) if isinstance(k, str) else k): self.value(x) for k, x in v.items()}
        return v


Redact = Callable[[str], str]
