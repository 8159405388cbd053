"""Bunny's Phi-2 chat template (`bunny` conversation style), reproduced character for character.

Fine-tuned Bunny/TAP-Chat checkpoints only answer well when prompted exactly as they were trained:
system text, `USER: ` / `ASSISTANT: ` roles, a space after each user turn, `<|endoftext|>` after each answer,
and the image placeholder `<image>\\n` at the start of the first user turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_PLACEHOLDER = "<image>"
EOS = "<|endoftext|>"
USER, ASSISTANT = "USER", "ASSISTANT"


@dataclass(frozen=True)
class Turn:
    """One exchange. `answer` is None for the turn being generated."""

    question: str
    answer: str | None = None


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
        question = f"{IMAGE_PLACEHOLDER}\n{turn.question}" if image and i == 0 else turn.question
        parts.append(f"{USER}: {question} ")
        if turn.answer is None:
            parts.append(f"{ASSISTANT}:")
        else:
            parts.append(f"{ASSISTANT}: {turn.answer}{EOS}")
    return "".join(parts)


def render_pretrain(caption: str) -> str:
    """Stage-1 (`plain`) sample: the image, then the caption and a newline; no roles, no EOS."""
    return f"{IMAGE_PLACEHOLDER}{caption}\n"
