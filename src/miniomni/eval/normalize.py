"""Whisper-style English text normalization for scoring (written here; openai-whisper is not imported).

What :func:`normalize_text` does, in order (see ``docs/evaluation.md`` for what is left out):

1. lowercase;
2. drop anything inside ``[...]``, ``<...>`` and ``(...)`` (noise tags, stage directions);
3. drop the filler words hmm, mm, mhm, mmm, uh, um;
4. expand common contractions (``won't`` -> ``will not``, ``n't`` -> ``not``, ``'re`` -> ``are``,
   ``'s`` -> ``is`` as Whisper does, ...) and a few title abbreviations (``mr`` -> ``mister``);
5. drop digit-grouping commas (``1,000`` -> ``1000``), then every punctuation mark or symbol except a
   decimal point between digits, ``%`` after a digit and ``$ £ €`` before one; accents are stripped;
6. spelled cardinal numbers become digits (``twenty one`` -> ``21``, ``one hundred`` -> ``100``,
   ``two thousand three hundred and five`` -> ``2305``); a lone ``one`` stays a word, as in Whisper;
7. a short list of British spellings becomes American (``colour`` -> ``color``);
8. whitespace is collapsed and stripped.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["normalize_text", "words_to_digits"]

_BRACKETS = re.compile(r"[<\[][^>\]]*[>\]]|\([^)]*\)")
_FILLERS = re.compile(r"\b(?:hmm|mm|mhm|mmm|uh|um)\b")

# Whole words first (order matters: "won't" before the generic "n't").
_WORD_CONTRACTIONS = {
    "won't": "will not", "can't": "can not", "shan't": "shall not", "let's": "let us", "ain't": "aint",
    "y'all": "you all", "gonna": "going to", "wanna": "want to", "gotta": "got to", "ma'am": "madam",
}
_TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint", "prof": "professor",
           "jr": "junior", "sr": "senior"}
# Then word endings.
_SUFFIX_CONTRACTIONS = [
    ("'s been", " has been"), ("'d been", " had been"), ("'s got", " has got"),
    ("n't", " not"), ("'re", " are"), ("'s", " is"), ("'d", " would"), ("'ll", " will"), ("'ve", " have"),
    ("'m", " am"),
]

_BRITISH = {
    "colour": "color", "colours": "colors", "coloured": "colored", "favourite": "favorite",
    "favourites": "favorites", "flavour": "flavor", "honour": "honor", "humour": "humor", "labour": "labor",
    "neighbour": "neighbor", "neighbours": "neighbors", "behaviour": "behavior", "harbour": "harbor",
    "centre": "center", "centres": "centers", "theatre": "theater", "metre": "meter", "metres": "meters",
    "litre": "liter", "organise": "organize", "organised": "organized", "realise": "realize",
    "realised": "realized", "recognise": "recognize", "recognised": "recognized", "apologise": "apologize",
    "analyse": "analyze", "travelling": "traveling", "travelled": "traveled", "cancelled": "canceled",
    "defence": "defense", "offence": "offense", "catalogue": "catalog", "grey": "gray", "jewellery": "jewelry",
    "programme": "program", "cheque": "check", "aluminium": "aluminum", "tyre": "tire", "plough": "plow",
}

_ONES = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])}
_TEENS = {w: 10 + i for i, w in enumerate(
    ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"])}
_TENS = {w: 10 * (i + 2) for i, w in enumerate(
    ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"])}
_MULTIPLIERS = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}


class _Number:
    """Accumulates one spelled cardinal: ``total`` (thousands and up) + ``current`` (below 1000)."""

    def __init__(self) -> None:
        self.total = 0
        self.current: int | None = None
        self.last: str | None = None  # kind of the last word taken
        self.last_multiplier: int | None = None

    def empty(self) -> bool:
        return self.last is None

    def value(self) -> int:
        return self.total + (self.current or 0)

    def take(self, word: str) -> bool:
        """Add ``word`` if it continues this number; False if it starts a new one (or is no number)."""
        if word in _ONES or word in _TEENS:
            value = _ONES.get(word, _TEENS.get(word))
            if self.last is None or (self.last == "tens" and word in _ONES and value > 0) \
                    or self.last in ("hundred", "multiplier"):
                if self.last in ("hundred", "multiplier") and value == 0:
                    return False
                self.current = (self.current or 0) + value
                self.last = "ones"
                return True
            return False
        if word in _TENS:
            if self.last is None or self.last in ("hundred", "multiplier"):
                self.current = (self.current or 0) + _TENS[word]
                self.last = "tens"
                return True
            return False
        if word == "hundred":
            if self.last is None:
                self.current, self.last = 100, "hundred"
                return True
            if self.last in ("ones", "tens") and self.current is not None and 0 < self.current % 100 == self.current:
                self.current *= 100
                self.last = "hundred"
                return True
            return False
        if word in _MULTIPLIERS:
            multiplier = _MULTIPLIERS[word]
            if self.last_multiplier is not None and multiplier >= self.last_multiplier:
                return False
            if self.last is None:
                self.total, self.current = multiplier, None
            elif self.current:
                self.total += self.current * multiplier
                self.current = None
            else:
                return False
            self.last, self.last_multiplier = "multiplier", multiplier
            return True
        return False


def _is_number_word(word: str) -> bool:
    return word in _ONES or word in _TEENS or word in _TENS or word == "hundred" or word in _MULTIPLIERS


def words_to_digits(text: str) -> str:
    """Replace runs of spelled cardinal number words by digits (space-separated, lowercase input)."""
    out: list[str] = []
    number = _Number()
    words = text.split()
    spelled: list[str] = []

    def flush() -> None:
        # A lone "one" stays a word ("one of them"), as Whisper's normalizer leaves it.
        out.append("one" if spelled == ["one"] else str(number.value()))
        spelled.clear()

    for index, word in enumerate(words):
        following = words[index + 1] if index + 1 < len(words) else ""
        if word == "and" and number.last in ("hundred", "multiplier") and (
                following in _ONES or following in _TEENS or following in _TENS) and following != "zero":
            continue  # "one hundred and five" -> 105
        if _is_number_word(word):
            if number.take(word):
                spelled.append(word)
                continue
            if not number.empty():
                flush()
            number = _Number()
            number.take(word)
            spelled.append(word)
            continue
        if not number.empty():
            flush()
            number = _Number()
        out.append(word)
    if not number.empty():
        flush()
    return " ".join(out)


def _strip_symbols(text: str) -> str:
    """Punctuation and symbols -> spaces (numeric ones kept inside numbers); accents dropped."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    kept: list[str] = []
    for index, char in enumerate(text):
        before = text[index - 1] if index else ""
        after = text[index + 1] if index + 1 < len(text) else ""
        numeric = ((char == "." and before.isdigit() and after.isdigit())  # decimal point
                   or (char == "%" and before.isdigit()) or (char in "$£€" and after.isdigit()))
        if numeric:
            kept.append(char)
        elif char in ".%$£€'":
            kept.append(" ")
        else:
            kept.append(char)
    out: list[str] = []
    for char in unicodedata.normalize("NFKD", "".join(kept)):
        category = unicodedata.category(char)
        if category == "Mn":
            continue
        if char in ".%$£€":
            out.append(char)
        elif category[0] in "MSP":
            out.append(" ")
        else:
            out.append(char)
    return "".join(out)


def normalize_text(text: str) -> str:
    """Whisper-style English normalization: see the module docstring for the steps."""
    s = text.lower().replace("\u2019", "'")
    s = _BRACKETS.sub(" ", s)
    s = _FILLERS.sub(" ", s)
    s = re.sub(r"\s+'", "'", s)
    for word, expansion in _WORD_CONTRACTIONS.items():
        s = re.sub(rf"\b{re.escape(word)}\b", expansion, s)
    for title, expansion in _TITLES.items():
        s = re.sub(rf"\b{title}\b\.?", expansion + " ", s)
    for suffix, expansion in _SUFFIX_CONTRACTIONS:
        s = re.sub(rf"{re.escape(suffix)}\b", expansion, s)
    s = _strip_symbols(s)
    s = words_to_digits(s)
    return " ".join(_BRITISH.get(word, word) for word in s.split())
