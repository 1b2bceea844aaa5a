"""CaseOps: a lossless case transform applied to text before tokenization (docs/FRONTIER.md §1.3).

The transform moves ASCII capitalisation into four private-use control
characters so the tokenizer sees lowercase words:

* TITLE (U+E001): the next letter was uppercase (a word's first letter);
* ALLCAPS (U+E002): the whole next word was uppercase;
* CAPNEXT (U+E003): the next letter, inside a word, was uppercase;
* ESC (U+E004): the next character is a literal control character.

A *word* is a maximal run of ASCII letters A–Z/a–z; digits, apostrophes,
hyphens and non-ASCII letters end it, and non-ASCII characters are never
changed. Encoding, in one left-to-right pass:

1. a literal U+E001–U+E004 in the input becomes ESC followed by it;
2. an all-lowercase word is unchanged;
3. an all-uppercase word of length >= 2 becomes ALLCAPS + the word lowercased;
4. an uppercase letter followed by a non-empty all-lowercase rest becomes
   TITLE + the word lowercased;
5. any other word is mixed: TITLE if its first letter is uppercase, then its
   letters lowercased with CAPNEXT before each later uppercase letter (so a
   lone capital "I" is TITLE i).

Examples: "The NASA Launch" → TITLE the ALLCAPS nasa TITLE launch; "iPhone"
→ i CAPNEXT phone; "OpenAI" → TITLE open CAPNEXT a CAPNEXT i.

Decoding inverts each rule and rejects what the encoder never writes: an
uppercase ASCII letter, TITLE or ALLCAPS not at a word start, ALLCAPS not
followed by a word of >= 2 lowercase letters, TITLE or CAPNEXT not followed
by a lowercase letter, CAPNEXT not inside a word, ESC not followed by a
control character.

Bytes of the original text (the byte sidecar, docs/FRONTIER.md §1.4). Every
character of the transformed text stands for a known number of original
UTF-8 bytes: a control character 0, unless it is the literal after an ESC
(then its own 3 bytes); any other character its UTF-8 length (a lowercased
ASCII letter is still 1 byte). A token is charged the sum over the span of
transformed characters it covers (SentencePiece's offset mapping), so the
tokens of a document sum to the UTF-8 length of the original document
minus the leading and trailing whitespace that SentencePiece drops.
"""
from __future__ import annotations

import re
from typing import Literal, Sequence

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CONTROLS = (TITLE, ALLCAPS, CAPNEXT, ESC)
CONTROL_PIECES_START = 4   # a CaseOps tokenizer's ids 4..7 are the controls (docs/FRONTIER.md §1.2)
CaseTransform = Literal["none", "caseops"]
CASE_TRANSFORMS: tuple[str, ...] = ("none", "caseops")

_LITERAL_CONTROL = re.compile("[\ue001-\ue004]")
# Only words with an uppercase letter change; lowercase words are left to the regex engine.
_CASED_WORD = re.compile("(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")
_DECODE = re.compile(
    "\ue004(?P<literal>[\ue001-\ue004])"
    "|(?<![A-Za-z])\ue002(?P<allcaps>[a-z]{2,})(?![a-z\ue003])"
    "|(?<![A-Za-z])\ue001(?P<title>[a-z])"
    "|(?<=[a-z])\ue003(?P<capnext>[a-z])"
    "|(?P<bad>[\ue001-\ue004A-Z])")
# An ESC and the control character it escapes, or a lone control character.
_CONTROL_RUN = re.compile("\ue004[\ue001-\ue004]|[\ue001-\ue004]")


class CaseOpsError(ValueError):
    """Text that no CaseOps encoding produces."""


def _encode_word(match: re.Match) -> str:
    word = match.group()
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    rest = word[1:]
    if word[0].isupper() and rest and rest.islower():
        return TITLE + lower
    out = [TITLE + lower[0] if word[0].isupper() else lower[0]]
    out.extend(CAPNEXT + low if ch.isupper() else low for ch, low in zip(rest, lower[1:]))
    return "".join(out)


def encode(text: str) -> str:
    """The CaseOps form of ``text`` (module docstring)."""
    escaped = _LITERAL_CONTROL.sub(lambda m: ESC + m.group(), text)
    return _CASED_WORD.sub(_encode_word, escaped)


def _decode_match(match: re.Match) -> str:
    kind = match.lastgroup
    value = match.group(kind)
    if kind == "literal":
        return value
    if kind != "bad":                       # allcaps, title, capnext: uppercase what they mark
        return value.upper()
    raise CaseOpsError(f"misplaced {_describe(value)} at character {match.start()}")


def _describe(char: str) -> str:
    names = dict(zip(CONTROLS, ("TITLE", "ALLCAPS", "CAPNEXT", "ESC")))
    return f"{names[char]} marker" if char in names else f"uppercase letter {char!r}"


def decode(text: str) -> str:
    """The original of CaseOps-encoded ``text``; CaseOpsError if it is malformed."""
    return _DECODE.sub(_decode_match, text)


def has_control_pieces(sp) -> bool:
    """Whether a SentencePieceProcessor's ids 4-7 are the controls as ordinary
    (user-defined) pieces: the layout of a CaseOps tokenizer, and only of one."""
    ids = range(CONTROL_PIECES_START, CONTROL_PIECES_START + len(CONTROLS))
    return sp.vocab_size() > ids[-1] and all(
        sp.id_to_piece(i) == c and not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
                                        or sp.is_unused(i))
        for i, c in zip(ids, CONTROLS))


def apply(transform: str, text: str) -> str:
    """``text`` under the named transform ("none" or "caseops")."""
    if transform == "none":
        return text
    if transform == "caseops":
        return encode(text)
    raise ValueError(f"unknown case transform {transform!r} (known: {', '.join(CASE_TRANSFORMS)})")


def char_original_bytes(transformed: str, caseops: bool = True) -> np.ndarray:
    """Original UTF-8 bytes each character of ``transformed`` stands for (int64 [len]);
    with ``caseops`` false the text is its own original (every character its UTF-8 length)."""
    codes = np.frombuffer(transformed.encode("utf-32-le"), dtype="<u4")
    weights = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
    if not caseops:
        return weights
    if ESC not in transformed:                  # no literals: every control character is a marker
        weights[(codes >= ord(TITLE)) & (codes <= ord(ESC))] = 0
        return weights
    for run in _CONTROL_RUN.finditer(transformed):
        weights[run.start()] = 0                # a marker, or the ESC of a literal (which keeps its 3)
    return weights


def piece_original_bytes(transformed: str, offsets: Sequence[tuple[int, int]],
                         caseops: bool = True) -> np.ndarray:
    """Original bytes of each token, given the tokens' character spans in ``transformed``."""
    cumulative = np.concatenate([[0], np.cumsum(char_original_bytes(transformed, caseops))])
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return cumulative[spans[:, 1]] - cumulative[spans[:, 0]]
