"""From words to concept names: what a `find` query or a chat question names in TAP's concept vocabulary.

A user types "Cars", "traffic lights", "cars and people" or "cras"; the vocabulary says "car", "traffic light",
"person". Names are compared after the same normalisation (case, underscores, spacing); plurals are singularised
with `inflect` and near names come from `difflib`, so no list of hand-written word forms needs keeping up.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from .errors import UnknownConceptError

#: How alike a misspelt query must be to a name or its plural (difflib's ratio) to be taken for it: "cras" ->
#: "cars" (0.75), "perosn" -> "person" (0.83) and "trafic light" (0.96) pass; a different short word ("cat" for
#: "car", 0.67) does not. difflib scores a swap of two letters low, hence the plurals and a cutoff below its 0.8.
NEAR = 0.75
#: Where one query names several concepts: "cars and people", "cars, trees & houses", "cat or dog", "car + bus".
SEPARATORS = re.compile(r"\s*(?:,|;|&|\+|/|\band\b|\bor\b)\s*")
#: Words that lead a query without naming anything ("all the cars", "every person").
LEADING = frozenset({"a", "an", "the", "all", "every", "each", "any", "some", "find", "show", "me"})
#: Function words a question is made of. A large vocabulary may hold some of them as nouns (a tin "can"), so
#: "Can you see the dog?" would otherwise find cans; `concepts_in` never takes these for names.
FUNCTION_WORDS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "there", "here", "it", "its", "is", "are", "was", "were",
    "be", "been", "am", "do", "does", "did", "can", "could", "will", "would", "shall", "should", "may", "might",
    "must", "have", "has", "had", "i", "you", "he", "she", "we", "they", "me", "us", "him", "her", "them", "my",
    "your", "our", "their", "what", "which", "who", "whom", "whose", "where", "when", "why", "how", "many", "much",
    "of", "in", "on", "at", "to", "for", "from", "by", "with", "about", "as", "and", "or", "not", "no"
})


def normalise(text: str) -> str:
    """Lower case, underscores and hyphens as spaces, single spaces: how queries and names are compared."""
    return " ".join(re.sub(r"[_\-]+", " ", text.lower()).split())


@lru_cache(maxsize=1)
def _inflect() -> Any:
    import inflect  # imported on first use: it takes a second or two to import

    return inflect.engine()


@lru_cache(maxsize=4096)
def singular(phrase: str) -> str:
    """The singular of a normalised noun phrase ("traffic lights" -> "traffic light"), or the phrase itself."""
    if not phrase or not phrase[-1].isalpha():
        return phrase
    return _inflect().singular_noun(phrase) or phrase


def plural(phrase: str) -> str:
    """The plural of a normalised noun phrase ("person" -> "people"), or the phrase itself."""
    if not phrase or not phrase[-1].isalpha():
        return phrase
    return _inflect().plural_noun(phrase) or phrase


class _Index:
    """A vocabulary's names by normalised form and by singular form (so "leaf" finds the name "leaves"), and the
    spellings a misspelt query is compared with: the names and their plurals."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.exact: dict[str, str] = {}
        for name in self.names:
            self.exact.setdefault(normalise(name), name)
        self.forms = dict(self.exact)
        for form, name in self.exact.items():
            self.forms.setdefault(singular(form), name)
        self.spellings = dict(self.exact)  # not the names' singulars: inflect's "gras" for "grass" is no spelling
        for form, name in self.exact.items():
            self.spellings.setdefault(plural(form), name)
        self.longest = max((len(form.split()) for form in self.forms), default=0)

    def lookup(self, phrase: str) -> str | None:
        """The name a normalised phrase says exactly, as written or singularised."""
        return self.forms.get(phrase) or self.forms.get(singular(phrase))

    def near(self, phrase: str, n: int = 1, cutoff: float = NEAR) -> list[str]:
        """Names spelt like the phrase (or its singular), most alike first."""
        scored: dict[str, float] = {}
        for form in dict.fromkeys((phrase, singular(phrase))):
            for match in difflib.get_close_matches(form, list(self.spellings), n=max(n, 3) * 2, cutoff=cutoff):
                ratio = difflib.SequenceMatcher(None, form, match).ratio()
                name = self.spellings[match]
                scored[name] = max(scored.get(name, 0.0), ratio)
        return sorted(scored, key=lambda name: -scored[name])[:n]


@lru_cache(maxsize=8)
def _index(names: tuple[str, ...]) -> _Index:
    return _Index(names)


def _strip_leading(phrase: str) -> str:
    words = phrase.split()
    while len(words) > 1 and words[0] in LEADING:
        words.pop(0)
    return " ".join(words)


def match_query(query: str, names: Sequence[str]) -> list[str]:
    """The vocabulary names a `find` query asks for, in query order, each once.

    The whole query is tried as one name first (so a name like "salt and pepper" is not split), then each part
    between "and", "or", commas, "&", "+" or "/": exactly, singularised, else the nearest spelling.

    Raises:
        UnknownConceptError: a part names nothing in the vocabulary; the message lists the closest names.
    """
    if not names:
        raise UnknownConceptError("this TAP has no concept vocabulary to search: load one (concepts=...)", [])
    index = _index(tuple(names))
    text = _strip_leading(normalise(re.sub(r"[^\w\s,;&+/\-]", " ", query)))
    if not text:
        raise UnknownConceptError("the query is empty: name what to find, e.g. 'cars'", [])
    whole = index.lookup(text)
    if whole is not None:
        return [whole]
    found: list[str] = []
    for part in filter(None, (_strip_leading(p) for p in SEPARATORS.split(text))):
        name = index.lookup(part) or next(iter(index.near(part)), None)
        if name is None:
            closest = index.near(part, n=5, cutoff=0.0)
            raise UnknownConceptError(f"{part!r} is not in the concept vocabulary ({len(index.names)} names); "
                                      f"closest: {', '.join(closest)}", closest)
        found.append(name)
    if not found:
        raise UnknownConceptError("the query names no concept: name what to find, e.g. 'cars'", [])
    return list(dict.fromkeys(found))


def concepts_in(text: str, names: Sequence[str]) -> list[str]:
    """The vocabulary names a free-text question mentions, in order, each once ("How many cars are there?" ->
    ["car"]): the longest name at each word wins ("traffic light" over "light"), exactly or singularised, never a
    near spelling (a question is not a query: guessing would find what nobody asked for)."""
    index = _index(tuple(names))
    words = re.findall(r"[a-z0-9']+", normalise(text))
    found: list[str] = []
    i = 0
    while i < len(words):
        for length in range(min(index.longest, len(words) - i), 0, -1):
            span = words[i:i + length]
            if length == 1 and span[0] in FUNCTION_WORDS:
                continue
            name = index.lookup(" ".join(span))
            if name is not None:
                found.append(name)
                i += length
                break
        else:
            i += 1
    return list(dict.fromkeys(found))
