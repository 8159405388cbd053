"""LangChain tools over a TAP-Chat conversation: `find_tool`, "find every car" for an agent.

A tool is bound to one `Session` (a live or reopened conversation, `Assistant.start` / `Assistant.open`): what it
finds becomes numbered regions of that chat, so a later question (or answer) can cite them as `<regionN>`. Its
output is JSON text an LLM can read; a query naming nothing known comes back as the plain message (not an
exception), so an agent can correct itself and try again.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.tools import StructuredTool, ToolException

from tokenizer_tap.errors import TapError
from tokenizer_tap.region import Region

from .session import Session
from .template import ConversationError

FIND_DESCRIPTION = ("Find every instance of an object kind on the conversation's current image, e.g. 'car' or "
                    "'cars and people'. Each becomes a numbered region the chat can refer to as <regionN>. Returns "
                    'JSON: {"found": {concept: count}, "regions": [{"ref", "number", "concept", "score", "box", '
                    '"caption"}]}, boxes in image pixels [x1, y1, x2, y2].')


def find_tool(chat: Session) -> StructuredTool:
    """The "find" tool for `chat`: takes a query, returns the regions found as JSON (see `FIND_DESCRIPTION`)."""

    def find(query: str) -> str:
        try:
            regions = chat.find(query)
            counts = chat.bot.find_counts(query, regions)
        except (TapError, ConversationError) as exc:  # unknown concept, no image: the agent reads why
            raise ToolException(str(exc)) from None
        return json.dumps({"found": counts, "regions": [_region(r) for r in regions]}, ensure_ascii=False)

    return StructuredTool.from_function(find, name="find", description=FIND_DESCRIPTION, handle_tool_error=True)


def _region(region: Region) -> dict[str, Any]:
    """A found region as the tool reports it: what an LLM needs to cite and place it, no mask."""
    return {"ref": region.ref, "number": region.number, "concept": region.concept,
            "score": round(float(region.concept_prob), 3),
            "box": None if region.box is None else [int(v) for v in region.box], "caption": region.caption}
