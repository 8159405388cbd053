"""The answer check: what an answer says about the regions it cites, compared with what TAP says about them.

An answer that calls `<region1>` a red car, where TAP's top concepts say house and its caption says white, gets a
short note ("TAP sees a white house here (<region1>)"). The note is kept beside the answer: the answer is never
changed and the note never goes back into a prompt, so answers stay exactly what the model wrote.

Why the rules are loose: a sentence names many things, and only some of them are about the cited region. So a
region is flagged only when nothing the answer calls it agrees with TAP. A concept claim fails when none of the
concept words said of the region is among TAP's top-k names. A colour claim fails when TAP's caption gives the
region's colour and none of the colours said of the region is that colour; a caption without one gives no verdict.
A colour describing some other thing ("standing on green grass") is no claim about the region.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from tokenizer_tap.vocabulary import singular

if TYPE_CHECKING:  # only the type: the synthetic world imports COLOURS without loading the models
    from tokenizer_tap.region import Region

#: The basic colour terms; the synthetic world paints with exactly these (tests/test_answer_check.py checks it).
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "white", "grey", "black")
SPELLINGS = {"gray": "grey"}
#: Words that place or frame a region rather than say what it is, even where a vocabulary lists them.
FRAMING = frozenset({"image", "picture", "photo", "scene", "background", "foreground", "left", "right", "top",
                     "bottom", "middle", "center", "centre", "side", "front", "back", "part", "area", "region",
                     "object", "thing", "one"})
MODIFIES = 2  # a colour describes a concept word at most this many words after it ("red sports car")

_WORD = re.compile(r"[a-z]+")
_TOKEN = re.compile(r"<(?:region|scene)\d+>|[a-z]+|,")
_SENTENCE = re.compile(r"[.!?;\n]+")
_CLAUSE = frozenset({",", "and", "but", "while", "whereas"})

Phrase = tuple[str, ...]
Index = dict[str, tuple[Phrase, ...]]


@dataclass
class Claims:
    """What an answer says of one region: concept phrases, and colours with the phrase each describes (None: the
    region itself, as in "<region1> is red")."""

    concepts: list[Phrase] = field(default_factory=list)
    colours: list[tuple[str, Phrase | None]] = field(default_factory=list)


def check_answer(answer: str, regions: Iterable[Region], concepts: Iterable[str] = (),
                 colours: Sequence[str] = COLOURS) -> list[str]:
    """Notes where the answer disagrees with TAP about a region it cites, one per region in order of citation.

    `regions` are those the answer may cite (matched by `ref`); `concepts` the words that count as concept claims
    (TAP's vocabulary; the regions' own top-k names always count).
    """
    by_ref = {r.ref: r for r in regions}
    if not by_ref:
        return []
    palette = tuple(colours)
    indexes = (_index(tuple(concepts), palette),
               _index(tuple(sorted({n for r in by_ref.values() for n, _ in r.concepts})), palette))
    claims: dict[str, Claims] = {}
    for sentence in _SENTENCE.split(answer.lower()):
        for ref, piece in _pieces(_TOKEN.findall(sentence)):
            if ref in by_ref:
                _gather(piece, indexes, palette, claims.setdefault(ref, Claims()))
    notes = (_note(by_ref[ref], said, indexes, palette) for ref, said in claims.items())
    return [n for n in notes if n]


def _pieces(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """Each cited region's words in one sentence: all of them where it cites one region. Otherwise the sentence is cut
    into clauses; a word goes to the nearest region its clause cites (a tie to the earlier one), and a clause that
    cites none to the region cited last before it."""
    refs = {t for t in tokens if t.startswith("<")}
    if len(refs) <= 1:
        return [(ref, tokens) for ref in refs]
    out: list[tuple[str, list[str]]] = []
    clause: list[str] = []
    last: str | None = None
    for token in [*tokens, ","]:
        if token not in _CLAUSE:
            clause.append(token)
            continue
        at = [i for i, t in enumerate(clause) if t.startswith("<")]
        if not at and last is not None:
            out.append((last, clause))
        elif at:
            bounds = [0, *((a + b) // 2 + 1 for a, b in zip(at, at[1:])), len(clause)]
            out += [(clause[i], clause[lo:hi]) for i, lo, hi in zip(at, bounds, bounds[1:])]
            last = clause[at[-1]]
        clause = []
    return out


def _gather(tokens: list[str], indexes: Sequence[Index], colours: tuple[str, ...], claims: Claims) -> None:
    """Add the concept phrases and colour words of `tokens` to `claims`."""
    spans = _phrases(tokens, indexes)
    claims.concepts += [tuple(tokens[a:b]) for a, b in spans]
    for i, token in enumerate(tokens):
        colour = _colour(token, colours)
        if colour is not None:
            described = next((tuple(tokens[a:b]) for a, b in spans if i < a <= i + MODIFIES), None)
            claims.colours.append((colour, described))


def _note(region: Region, claims: Claims, indexes: Sequence[Index], colours: tuple[str, ...]) -> str:
    """The note for one region ("TAP sees a white house here (<region1>)"), or "" when nothing disagrees."""
    top = [tuple(_WORD.findall(name.lower())) for name, _ in region.concepts]

    def is_top(phrase: Phrase) -> bool:
        return any(_alike(phrase, t) for t in top)

    wrong_concept = bool(top and claims.concepts) and not any(is_top(p) for p in claims.concepts)
    said = {c for c, p in claims.colours if p is None or is_top(p)}
    seen = _caption_colours(region.caption, indexes, colours)
    wrong_colour = bool(said and seen) and not said & set(seen)
    if not (wrong_concept or wrong_colour):
        return ""
    thing = f"{' and '.join(seen[:2])} {region.concept or 'object'}".strip()
    if not (thing.endswith("s") and not thing.endswith(("ss", "us"))):  # "TAP sees leaves", "TAP sees a bus"
        thing = ("an " if thing[0] in "aeiou" else "a ") + thing
    return f"TAP sees {thing} here ({region.ref})"


def _caption_colours(caption: str, indexes: Sequence[Index], colours: tuple[str, ...]) -> list[str]:
    """The colours a caption gives its subject: those up to its first concept phrase ("a red car next to a white
    house": red; "the roof of a red house": none), or all of them when it names no known concept."""
    tokens = _TOKEN.findall(caption.lower())
    spans = _phrases(tokens, indexes)
    found = [c for t in tokens[:spans[0][1] if spans else None] if (c := _colour(t, colours)) is not None]
    return list(dict.fromkeys(found))


def _colour(token: str, colours: tuple[str, ...]) -> str | None:
    token = SPELLINGS.get(token, token)
    return token if token in colours else None


def _phrases(tokens: list[str], indexes: Sequence[Index]) -> list[tuple[int, int]]:
    """Spans of known concept phrases in `tokens`, the longest at each position, not overlapping."""
    spans, i = [], 0
    while i < len(tokens):
        n = max((len(p) for ix in indexes for f in _forms(tokens[i]) for p in ix.get(f, ())
                 if _alike(tuple(tokens[i:i + len(p)]), p)), default=0)
        if n:
            spans.append((i, i + n))
        i += max(n, 1)
    return spans


@lru_cache(maxsize=4)
def _index(names: tuple[str, ...], colours: tuple[str, ...]) -> Index:
    """Concept phrases by each form of their first word; built once per vocabulary (thousands of names)."""
    index: dict[str, set[Phrase]] = {}
    for name in names:
        words = tuple(_WORD.findall(name.lower()))
        if not words or (len(words) == 1 and (_colour(words[0], colours) or words[0] in FRAMING)):
            continue
        for form in _forms(words[0]):
            index.setdefault(form, set()).add(words)
    return {k: tuple(v) for k, v in index.items()}


def _alike(a: Phrase, b: Phrase) -> bool:
    """Whether two phrases are the same words up to singular and plural ("red houses" ~ "red house")."""
    return len(a) == len(b) and all(_forms(x) & _forms(y) for x, y in zip(a, b))


@lru_cache(maxsize=8192)
def _forms(word: str) -> frozenset[str]:
    """The word and the singular it may be the plural of ("houses": house, "men": man), as `find` reads queries."""
    return frozenset({word, singular(word)})
