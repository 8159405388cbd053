"""A conversation's state and how its next prompt is assembled within the context budget.

Rules (stable, because fine-tuning data is rendered the same way):
- Regions get ids `<region1>`, `<region2>` ... in the order they are added, fixed for the whole conversation.
- A user turn as the model sees it ("prompt") is the grounding lines of the regions it adds or mentions, one
  per line, then the user's text. Once sent, a turn's prompt is frozen, so later turns reproduce it exactly (and
  the KV cache of the earlier turns stays valid).
- The model sees only the turns since the latest image: switching images starts a new visual context; the earlier
  turns stay in the history but leave the prompt.
- Over budget, the oldest turns are dropped first; the image and the current turn (with its regions) never are.
- Unfinished (stopped) answers stay in the history but are left out of the prompt.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenizer_tap.predictor import Region
from tokenizer_tap.prompts import Prompt

from .grounding import GroundedRegion, grounding_block
from .template import EOS, IMAGE_PLACEHOLDER, Turn, render

MENTION_RE = re.compile(r"<region(\d+)>")
MAX_MESSAGE_CHARS = 8000


class ConversationError(ValueError):
    """A request the conversation cannot serve (empty or huge message, unknown region, nothing fits)."""


@dataclass
class RegionEntry:
    number: int
    image_key: str
    prompt: Prompt
    grounded: GroundedRegion
    region: Region | None = None  # TAP's output with the full-size mask (None when restored without a mask)
    removed: bool = False


@dataclass
class TurnEntry:
    text: str  # what the user typed
    prompt: str  # the user turn as the model saw it (grounding lines + text), without `<image>`
    image_key: str | None
    regions: list[int]
    answer: str = ""
    complete: bool = False
    message_id: int | None = None  # the stored assistant message, when a store is attached


@dataclass
class Conversation:
    """Everything one chat needs between turns. Mutated only under `lock` (one turn at a time)."""

    id: str
    owner: str = "local"
    title: str = "New chat"
    image_key: str | None = None
    image_sha: str | None = None  # the current image in the store
    regions: dict[int, RegionEntry] = field(default_factory=dict)
    turns: list[TurnEntry] = field(default_factory=list)
    new_regions: list[int] = field(default_factory=list)  # added since the last turn
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def next_number(self) -> int:
        return max(self.regions, default=0) + 1

    def active_regions(self) -> list[RegionEntry]:
        return [r for r in self.regions.values() if not r.removed]


@dataclass(frozen=True)
class PromptPlan:
    """The text to run and what the budget did to it."""

    text: str
    user_prompt: str
    region_numbers: list[int]
    kept_turns: int
    dropped_turns: int  # history turns left out to fit the context (image switches are not counted)
    max_new_tokens: int


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


def turn_regions(conv: Conversation, text: str) -> list[int]:
    """Region numbers a turn carries: those it mentions plus those added since the last turn."""
    mentioned = [int(n) for n in MENTION_RE.findall(text)]
    unknown = sorted({n for n in mentioned if n not in conv.regions or conv.regions[n].removed})
    if unknown:
        raise ConversationError(f"unknown region(s): {', '.join(f'<region{n}>' for n in unknown)}")
    numbers = {n for n in conv.new_regions if n in conv.regions and not conv.regions[n].removed}
    return sorted(numbers | set(mentioned))


def user_prompt(text: str, regions: list[GroundedRegion]) -> str:
    block = grounding_block(regions)
    return f"{block}\n{text}" if block else text


def plan_prompt(conv: Conversation, user_text: str, regions: list[GroundedRegion], *, visual: bool,
                count: Callable[[str], int], max_context: int, max_new_tokens: int) -> PromptPlan:
    """Fit history + the new turn into `max_context` positions, dropping the oldest turns first.

    `count(text)` gives the positions a rendered prompt occupies (visual tokens included). At least
    min(max_new_tokens, max_context // 8) positions are kept free for the answer.
    """
    prompt = user_prompt(user_text, regions)
    history = [t for t in conv.turns if t.complete and t.image_key == conv.image_key]
    image = visual and conv.image_key is not None
    reserve = min(max_new_tokens, max_context // 8)
    for start in range(len(history) + 1):
        turns = [Turn(t.prompt, t.answer) for t in history[start:]] + [Turn(prompt)]
        text = render(turns, image=image)
        used = count(text)
        if used + reserve <= max_context:
            return PromptPlan(text, prompt, [r.number for r in regions], len(history) - start, start,
                              min(max_new_tokens, max_context - used))
    raise ConversationError(f"the message and its regions need {used} of the model's {max_context} positions; "
                            "shorten the message or mention fewer regions")
