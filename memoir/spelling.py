"""Subject spellings: a query that writes an edit's subject with a typo, other casing or accents,
other spacing or punctuation, as its acronym, or as one of the edit's ``aliases`` still names it.

The subject router's hidden-state keys (:mod:`memoir.subject_router`) forgive a possessive or an
article but not a changed token: a misspelt name is split into other tokens, and no early hidden
state of SmolLM2 maps them back (docs/results.md, "No layer bridges a typo").  This index adds a
second, character-level test, OR-ed with the first (``subject_spellings``):

- every form of an edit's subject (the subject and each alias) is *normalised*: accents stripped,
  case folded, split into words of letters and digits, a leading "the" dropped;
- a query names the form when some run of its words, joined without spaces, is within
  tolerated edits (insertions, deletions, substitutions, adjacent swaps) of the form's words, word
  by word: :func:`tolerance` of each word's length, 0 below 5 letters ("Iran" is not "Iraq"), 1
  below 9, 2 above ("Chevelle" is not "Chevette"); or, a space added or lost ("New York",
  "NewYork"), the words joined within one edit;
- a word that needs edits must be *no word of the model's vocabulary* (it takes two or more
  tokens): a typo splits a name into rarer pieces ("Japna" is two tokens), while another real name
  or word usually is one ("Paris" does not match "Parks");
- numbers, codes and words of up to three letters are never misspelt ("Gregory IX" is not
  "Gregory II", "Renault 12" not "Renault 25");
- a run inside a longer capitalised name names nothing ("Papua New Guinea" is not "Guinea",
  "University of Manchester" not "Manchester"), and a word with an added ending other than "s" is
  another word, not a typo ("Azerbaijani" is not "Azerbaijan");
- a subject of three or more capitalised words also has its acronym ("United States of America" ->
  "USA"); with ``subject_common_aliases`` a subject listed in ``memoir/data/aliases.txt`` also has
  its other names there ("Holland" for "Netherlands", "Bombay" for "Mumbai", "US" for "United
  States").  Acronyms and other names of two to four capitals ("US", "U.S.", "NYC") match only as
  written, in capitals, with no typo (the subject itself matches in any case): the pronoun "us" names nothing, and acronyms of two letters are not
  made up from subjects ("HD", "SS", "GP" collide too often), only taken from the table or ``aliases``.

Candidates come from an index of each form word and its one-letter deletions (the symmetric
deletion scheme of spelling correctors), so a query is compared only with forms that share a word
or a near-word with it, not with every stored edit.  Only eligibility changes: among the eligible
edits the mask overlap still picks one, and only above ``threshold``.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
import unicodedata
from dataclasses import dataclass

_WORD = re.compile(r"[^\W_]+")
_TOKEN_CACHE = 100_000
_STOP = frozenset("the a an of and in on at to for by de la le du von van".split())


def tolerance(letters: int) -> int:
    """Edits a word of ``letters`` letters tolerates."""
    return 0 if letters < 5 else 1 if letters < 9 else 2


def strict(word: str) -> bool:
    """A word that must be written exactly: a number, a model code ("4CV") or a word of at most
    three letters (a roman numeral, an initial): "Gregory IX" is not "Gregory II"."""
    return len(word) <= 3 or any(ch.isdigit() for ch in word)


def fold(text: str) -> str:
    """``text`` case-folded and without accents ("Zürich" -> "zurich")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def words(text: str) -> list[tuple[str, int, int]]:
    """The folded words of ``text`` with their character spans in it."""
    return [(fold(m.group()), m.start(), m.end()) for m in _WORD.finditer(text)]


def acronym(subject: str) -> str | None:
    """Initials of a subject's capitalised words, or None with fewer than three of them."""
    caps = [w for w in subject.split() if w[:1].isupper() and w.isalpha()]
    return "".join(w[0] for w in caps) if len(caps) >= 3 else None


def _key(name: str) -> str:
    ws = [w for w, _, _ in words(name)]
    return " ".join(ws[1:] if ws[:1] == ["the"] and len(ws) > 1 else ws)


@functools.lru_cache(maxsize=1)
def _alias_groups() -> dict[str, tuple[str, ...]]:
    groups = {}
    text = importlib.resources.files("memoir").joinpath("data/aliases.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            names = tuple(n.strip() for n in line.split("|") if n.strip())
            for name in names:
                groups[_key(name)] = names
    return groups


def common_aliases(subject: str | None) -> tuple[str, ...]:
    """The other names of ``subject`` in the shipped table of common aliases (memoir/data/aliases.txt)."""
    if not subject:
        return ()
    names = _alias_groups().get(_key(subject), ())
    return tuple(n for n in names if _key(n) != _key(subject))


def cased(name: str) -> bool:
    """A name matched only as written: two to four capitals, dots allowed ("US", "U.S.", "NYC")."""
    letters = [ch for ch in name if not ch.isspace() and ch != "."]
    return 2 <= len(letters) <= 4 and all(ch.isupper() for ch in letters)


def _alnum(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum())


def deletions(word: str) -> set[str]:
    return {word[:i] + word[i + 1:] for i in range(len(word))}


def edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance of ``a`` and ``b`` (adjacent swaps count one), or
    ``limit + 1`` once it exceeds ``limit``."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


@dataclass(frozen=True)
class Form:
    edit_id: int
    words: tuple[str, ...]  # folded, leading "the" dropped
    text: str  # as written (the subject or an alias)
    cased: bool = False  # matched only as written (an acronym, "US"): no typos, case kept

    @property
    def joined(self) -> str:
        return "".join(self.words)


def forms_of(edit_id: int, subject: str | None, aliases=(), common: bool = True) -> list[Form]:
    """The forms of an edit's subject: the subject, its ``aliases``, its acronym and, with
    ``common``, its other names in the table of common aliases."""
    names = ([subject] if subject else []) + list(aliases)
    names += [n for n in common_aliases(subject) if n not in names] if common else []
    short = acronym(subject) if subject else None
    if short and short not in names:
        names.append(short)
    out = []
    for name in names:
        ws = [w for w, _, _ in words(name)]
        if ws and ws[0] == "the" and len(ws) > 1:
            ws = ws[1:]
        if ws:
            out.append(Form(edit_id, tuple(ws), name, cased=name == short or (name != subject and cased(name))))
    return out


_CONNECTORS = frozenset("of de du la le von van der del di da the".split())


def _capitalised(word: str) -> bool:
    return word[:1].isupper() and not word.isupper()


def _sentence_start(text: str, at: int) -> bool:
    before = text[:at].rstrip()
    return not before or before[-1] in ".?!:;\"'(\n"


def _inside_name(qwords, start: int, end: int, text: str) -> bool:
    """Is the run ``qwords[start:end]`` part of a longer capitalised name: a capitalised word right
    after it, or right before it (also across "of", "de", ...) that does not open a sentence, with
    only spaces between?  "Papua New Guinea" does not name "Guinea", "University of Manchester" not
    "Manchester".  Queries in capitals have no capitalised words and are never cut."""
    def joined(i: int) -> bool:  # words i and i + 1 are separated by spaces only
        return not text[qwords[i][2]:qwords[i + 1][1]].strip()

    def word(i: int) -> str:
        return text[qwords[i][1]:qwords[i][2]]

    if end < len(qwords) and joined(end - 1) and _capitalised(word(end)):
        return True
    j = start - 1
    if j >= 0 and qwords[j][0] == "the":
        return False  # "the X", "The X": an article, not a name
    if j >= 1 and qwords[j][0] in _CONNECTORS and not _capitalised(word(j)) and joined(j):
        j -= 1
    return (j >= 0 and joined(j) and _capitalised(word(j)) and not _sentence_start(text, qwords[j][1]))


class SpellingIndex:
    """The forms of the stored edits' subjects, indexed by word and one-letter deletions."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.forms: list[Form] = []
        self._index: dict[str, set[int]] = {}
        self._token_counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.forms)

    def add(self, edit_id: int, subject: str | None, aliases=(), common: bool = True) -> None:
        for form in forms_of(edit_id, subject, aliases, common):
            f = len(self.forms)
            self.forms.append(form)
            keys = set(form.words) - _STOP
            if len(form.words) > 1:
                keys.add(form.joined)  # the name written as one word ("NewYork")
            for w in list(keys):
                if len(w) >= 5 and not form.cased:
                    keys |= deletions(w)
            for key in keys:
                self._index.setdefault(key, set()).add(f)

    def _tokens(self, word: str) -> int:
        if word not in self._token_counts:
            if len(self._token_counts) >= _TOKEN_CACHE:  # a long-running server meets endless words
                self._token_counts.clear()
            self._token_counts[word] = len(self.tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"])
        return self._token_counts[word]

    def named(self, text: str) -> set[int]:
        """Ids of the edits ``text`` names in some form."""
        qwords = words(text)
        hits: dict[int, set[int]] = {}  # form -> query word positions it was found from
        for p, (w, _, _) in enumerate(qwords):
            if w in _STOP:
                continue
            for key in {w} | (deletions(w) if len(w) >= 5 else set()):
                for f in self._index.get(key, ()):
                    hits.setdefault(f, set()).add(p)
        found = set()
        for f, positions in hits.items():
            form = self.forms[f]
            if form.edit_id not in found and self._matches(form, qwords, positions, text):
                found.add(form.edit_id)
        return found

    def _matches(self, form: Form, qwords, positions, text: str) -> bool:
        n = len(form.words)
        if form.cased:
            written = _alnum(form.text)
            runs = [qwords[p - j:p - j + n] for p in positions for j in range(n) if p - j >= 0]
            return any(len(run) == n and _alnum(text[run[0][1]:run[-1][2]]) == written for run in runs)
        for p in positions:
            for j in range(n):  # query word p stands for form word j
                for size in (n, n - 1, n + 1):
                    start = p - j
                    if size < 1 or start < 0 or start + size > len(qwords):
                        continue
                    run = qwords[start:start + size]
                    d = self._distance(form.words, [w for w, _, _ in run])
                    if d is None:
                        continue
                    if _inside_name(qwords, start, start + size, text):
                        continue
                    if d == 0 or self._not_words(form, run, text):
                        return True
        return False

    def _not_words(self, form: Form, run, text: str) -> bool:
        """Every word of ``run`` that differs from the form's is no word of the vocabulary (it takes
        two or more tokens): "Japna" is a misspelling, "Parks" another name."""
        if self.tokenizer is None:
            return True
        return all(self._tokens(text[a:b]) >= 2 for w, a, b in run if w not in form.words)

    @staticmethod
    def _distance(form: tuple[str, ...], run: list[str]) -> int | None:
        """Edits from ``form`` to ``run``, or None beyond what the form tolerates: word by word when
        the counts agree (each word within its own :func:`tolerance`, strict words exact); else (a
        space added or lost) the joined words within one edit, or equal when the form has a strict
        word."""
        if len(run) == len(form):
            total = 0
            for a, b in zip(form, run):
                limit = 0 if strict(a) else tolerance(len(a))
                if b.startswith(a) and b[len(a):] not in ("", "s"):
                    return None  # an added ending is another word ("Azerbaijani"), not a typo
                d = edit_distance(a, b, limit)
                if d > limit:
                    return None
                total += d
            return total
        strict_words = any(strict(w) for w in form)  # no way to tell which letters are theirs: spacing only
        limit = 0 if strict_words else min(1, sum(tolerance(len(w)) for w in form))
        d = edit_distance("".join(form), "".join(run), limit)
        return d if d <= limit else None
