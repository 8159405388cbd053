"""Bunny's Phi-2 chat template (`bunny` conversation style), reproduced character for character.

Fine-tuned Bunny/TAP-Chat checkpoints only answer well when prompted exactly as they were trained:
system text, `USER: ` / `ASSISTANT: ` roles, a space after each user turn, `<|endoftext|>` after each answer,
and the image placeholder `<image>\\n` at the start of the first user turn.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenizer_tap.region import Region

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_PLACEHOLDER = "<image>"
EOS = "<|endoftext|>"
USER, ASSISTANT = "USER", "ASSISTANT"


@dataclass
class Turn:
    """One exchange, the one turn type: what the model saw and answered, and what a conversation keeps about it.

    `prompt` is the user turn as the model sees it (grounding lines, then the user's `text`), without `<image>`.
    `answer` is None in a generation prompt; while an answer streams it grows and `complete` stays False (stopped
    answers stay in the history but out of later prompts).
    """

    prompt: str
    answer: str | None = None
    text: str = ""  # what the user typed ("" where only the prompt is known)
    image: str | None = None  # the image it was asked about (content key; the stored sha for earlier images)
    regions: list[int] = field(default_factory=list)  # the `<regionN>` numbers it carries
    complete: bool = True
    message_id: int | None = None  # the stored answer, when a store is attached
    note: str = ""  # where the answer disagrees with TAP about a cited region (check.py); never in a prompt


def render(turns: Sequence[Turn], *, image: bool = True, system: str = SYSTEM) -> str:
    """The conversation as the model sees it.

    With `image`, `<image>\\n` opens the first user turn. If the last turn has no answer the string ends with
    `ASSISTANT:` (no trailing space): the generation prompt. Otherwise every answer is followed by `<|endoftext|>`,
    which is the training string.

    Example (one turn, generation prompt):
        `A chat between ... questions. USER: <image>\\nWhat is this? ASSISTANT:`
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    for t in turns[:-1]:
        if t.answer is None:
            raise ValueError("only the last turn may be unanswered")
    parts = [system, " "]
    for i, turn in enumerate(turns):
        question = f"{IMAGE_PLACEHOLDER}\n{turn.prompt}" if image and i == 0 else turn.prompt
        parts.append(f"{USER}: {question} ")
        if turn.answer is None:
            parts.append(f"{ASSISTANT}:")
        else:
            parts.append(f"{ASSISTANT}: {turn.answer}{EOS}")
    return "".join(parts)


def render_pretrain(caption: str) -> str:
    """Stage-1 (`plain`) sample: the image, then the caption and a newline; no roles, no EOS."""
    return f"{IMAGE_PLACEHOLDER}{caption}\n"


GRID = 1000  # coordinates are written as integers 0..GRID-1
MAX_CAPTION = 120
LINE_RE = re.compile(
    r'^<(?P<kind>region|scene)(?P<number>\d+)>: (?P<concept>.*) \((?P<prob>\d\.\d\d)\), '
    r'box \[(?P<box>\d+,\d+,\d+,\d+)\] '
    r'on a 0-999 grid, (?:(?P<place>[a-z ]+), )?(?P<area><1|\d+)% of image, "(?P<caption>[^"]*)"$')


def line(region: Region, position: bool = False) -> str:
    """The grounding line of a region (its `number`, `kind`, concept, box, area and caption); with `position`, the
    coarse position word ("top left") after the box, as find-grounded turns write it."""
    area = 100.0 * region.area
    share = "<1" if area < 1 else str(round(area))
    where = f"{region.position}, " if position and region.position else ""
    return (f"{region.ref}: {_clean(region.concept, 60) or 'object'} ({region.concept_prob:.2f}), "
            f"box [{','.join(map(str, grid_box(region)))}] on a 0-999 grid, {where}{share}% of image, "
            f'"{_clean(region.caption, MAX_CAPTION)}"')


def found_line(found: dict[str, int]) -> str:
    """'found: 2 × car, 0 × dog': how many instances of each concept a question names TAP found (none is grounding
    too: it says the concept was looked for)."""
    return "found: " + counts_text(found)


def counts_text(found: dict[str, int]) -> str:
    """'2 × car, 0 × dog': instances per concept, the one wording a grounding line, the app and the CLI share."""
    return ", ".join(f"{n} × {concept}" for concept, n in found.items())


def grid_box(region: Region) -> tuple[int, int, int, int]:
    """The region's pixel box (exclusive end) on the 0-999 grid over the image's width and height."""
    if region.box is None:
        return (0, 0, 0, 0)
    (x1, y1, x2, y2), (width, height) = region.box, region.size
    gx1, gy1 = _grid(x1, width), _grid(y1, height)  # the last covered grid cell is just below x2
    return gx1, gy1, max(gx1, _grid(x2, width, end=True)), max(gy1, _grid(y2, height, end=True))


def _grid(value: float, size: int, end: bool = False) -> int:
    cell = value * GRID / max(size, 1)
    return min(GRID - 1, max(0, math.ceil(cell) - 1 if end else int(cell)))


def _clean(text: str, limit: int) -> str:
    """One printable line without double quotes, at most `limit` characters."""
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text).replace('"', "'")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def parse_line(text: str) -> Region:
    """Inverse of `line`, on a 1000x1000 image (so the box reads back as the grid box; area "<1" as 0.5%);
    raises ValueError on any other text."""
    m = LINE_RE.match(text)
    if not m:
        raise ValueError(f"not a region line: {text!r}")
    area = 0.5 if m["area"] == "<1" else float(m["area"])
    x1, y1, x2, y2 = (int(v) for v in m["box"].split(","))
    return Region([(m["concept"], float(m["prob"]))], m["caption"], box=(x1, y1, x2 + 1, y2 + 1), area=area / 100,
                  size=(GRID, GRID), number=int(m["number"]), kind=m["kind"])


def grounding_block(regions: list[Region], found: dict[str, int] | None = None) -> str:
    """The lines for the regions a turn mentions or adds, one per line: user regions by number, then scene ones.

    A find-grounded turn (`found`: instances per concept the question names) writes each line with its position
    word and ends with the counts.
    """
    lines = [line(r, position=found is not None) for r in sorted(regions, key=lambda r: (r.kind != "region", r.number))]
    return "\n".join(lines + ([found_line(found)] if found else []))


MENTION_RE = re.compile(r"<region(\d+)>")
MAX_MESSAGE_CHARS = 8000


class ConversationError(ValueError):
    """A request the conversation cannot serve (empty or huge message, unknown region, nothing fits)."""


@dataclass(frozen=True)
class PromptPlan:
    """The text to run and what the budget did to it."""

    text: str
    user_prompt: str
    region_numbers: list[int]
    kept_turns: int
    dropped_turns: int  # history turns left out to fit the context (image switches are not counted)
    max_new_tokens: int
    regions: tuple[Region, ...] = ()  # the regions whose lines the turn carries (the answer check reads them)


def clean_message(text: str) -> str:
    """The user's text, refused when empty or huge; template control strings are neutralised."""
    if not isinstance(text, str):
        raise ConversationError("the message must be text")
    text = text.replace(EOS, "").replace(IMAGE_PLACEHOLDER, "image").strip()
    if not text:
        raise ConversationError("the message is empty: type a question")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ConversationError(f"the message is too long ({len(text)} characters; the limit is "
                                f"{MAX_MESSAGE_CHARS})")
    return text


def user_prompt(text: str, regions: list[Region], found: dict[str, int] | None = None) -> str:
    """A turn as the model sees it: the regions' grounding lines (and find counts), then the text (only the text
    without regions)."""
    block = grounding_block(regions, found)
    return f"{block}\n{text}" if block else text


def plan_prompt(turns: Sequence[Turn], image: str | None, user_text: str, regions: list[Region], *, visual: bool,
                count: Callable[[str], int], max_context: int, max_new_tokens: int,
                found: dict[str, int] | None = None) -> PromptPlan:
    """Fit the history (`turns`, with `image` the current image) and the new turn into `max_context` positions,
    dropping the oldest turns first. `found`: the find counts of a find-grounded turn (`grounding_block`).

    `count(text)` gives the positions a rendered prompt occupies (visual tokens included). At least
    min(max_new_tokens, max_context // 8) positions are kept free for the answer.
    """
    prompt = user_prompt(user_text, regions, found)
    history = [t for t in turns if t.complete and t.image == image]
    with_image = visual and image is not None
    reserve = min(max_new_tokens, max_context // 8)
    for start in range(len(history) + 1):
        text = render(history[start:] + [Turn(prompt)], image=with_image)
        used = count(text)
        if used + reserve <= max_context:
            return PromptPlan(text, prompt, [r.number for r in regions], len(history) - start, start,
                              min(max_new_tokens, max_context - used), tuple(regions))
    raise ConversationError(f"the message and its regions need {used} of the model's {max_context} positions; "
                            "shorten the message or mention fewer regions")
