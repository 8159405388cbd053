"""`Session`: one conversation, the only object that changes it.

It owns the conversation's state (image, regions, turns), every store write about it, its caches (the KV prefix of its
last turn, its segment-everything candidates, its decoded region masks) and its region edits. The models, the
decode lane and the caches shared across conversations stay in the `Assistant`, which a session borrows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tokenizer_tap.image_io import ImageSource, decode_image
from tokenizer_tap.prompts import Prompt
from tokenizer_tap.region import Region
from tokenizer_tap.visualize import anchor, annotate, colour, tint

from .check import check_answer
from .decoding import End, GenerationSettings
from .remote import ServerError
from .reply import GenerationError, Reply, ReplyStream
from .template import MENTION_RE, ConversationError, Turn, clean_message, plan_prompt, user_prompt

if TYPE_CHECKING:
    from .engine import Assistant

SAVE_EVERY_S = 1.0  # how often a streaming answer is written to the store


class Session:
    """One conversation: its regions, turns and image, kept in memory and (with a store) on disk.

    Example:
        chat = bot.start(image="photo.jpg")
        chat.add_region(Prompt.point(120, 340))        # <region1> for the whole conversation
        print(chat.ask("What is <region1> doing?").text)
    """

    def __init__(self, bot: Assistant, id: str, owner: str = "local", title: str = "New chat") -> None:
        self.bot, self.id, self.owner, self.title = bot, id, owner, title
        self.image_key: str | None = None  # the current image's content key (the predictor's feature cache)
        self.image_sha: str | None = None  # the current image in the store
        self.regions: dict[int, Region] = {}  # by number, removed ones too (numbers are never reused)
        self.turns: list[Turn] = []
        self.new_regions: list[int] = []  # added since the last turn: the next turn carries them
        self.lock = threading.Lock()  # state changes one at a time
        self.candidates_found: tuple[str | None, list[Region]] = (None, [])  # segment everything, per image
        self._anchors: dict[int, tuple[np.ndarray, tuple[int, int] | None]] = {}  # label positions, per mask
        self._tinted: tuple[str | None, list[np.ndarray], np.ndarray | None] = (None, [], None)  # overlay so far
        self._running: threading.Event | None = None  # the cancel switch of the answer being written

    # ----------------------------------------------------------------------------------------------- state
    def next_number(self) -> int:
        """The number the next region gets: removed regions keep theirs, so numbers are never reused."""
        return max(self.regions, default=0) + 1

    def active_regions(self) -> list[Region]:
        """The regions not removed, on every image, in the order they were added."""
        return [r for r in self.regions.values() if not r.removed]

    def turn_regions(self, text: str) -> list[int]:
        """Region numbers a turn carries: those it mentions plus those added since the last turn."""
        mentioned = [int(n) for n in MENTION_RE.findall(text)]
        unknown = sorted({n for n in mentioned if n not in self.regions or self.regions[n].removed})
        if unknown:
            raise ConversationError(f"unknown region(s): {', '.join(f'<region{n}>' for n in unknown)}")
        numbers = {n for n in self.new_regions if n in self.regions and not self.regions[n].removed}
        return sorted(numbers | set(mentioned))

    def current_regions(self) -> list[Region]:
        """The active regions of the current image, in number order."""
        return [r for r in self.active_regions() if r.image == self.image_key]

    def live_region(self, number: int) -> Region:
        """Region `number` unless it is unknown or removed, which raises ConversationError."""
        entry = self.regions.get(number)
        if entry is None or entry.removed:
            raise ConversationError(f"unknown region <region{number}>")
        return entry

    def pixels(self) -> np.ndarray | None:
        """The current image's pixels (read-only, shared by every redraw), or None without a stored image."""
        return None if self.image_sha is None else self.bot.pixels(self.image_sha)

    def overlay(self, focus: int | Collection[int] | None = None) -> Image.Image | None:
        """The current image with every active region tinted, outlined and numbered; `focus` (one region or several:
        those an answer cites) stands out.

        The tinted image is kept: a click that adds a region tints only the new mask onto it.
        """
        image = self.pixels()
        if image is None:
            return None
        regions = self.current_regions()
        masks = [r.mask for r in regions]
        cols = [colour(r.number - 1) for r in regions]
        focused = {focus} if isinstance(focus, int) else set(focus or ())
        if picked := [i for i, r in enumerate(regions) if r.number in focused]:
            rest = [j for j in range(len(regions)) if j not in picked]
            base = tint(tint(image, [masks[j] for j in rest], [cols[j] for j in rest], alpha=0.15),
                        [masks[i] for i in picked], [cols[i] for i in picked], alpha=0.6)
        else:
            sha, drawn, base = self._tinted
            if sha != self.image_sha or len(drawn) > len(masks) or any(a is not b for a, b in zip(drawn, masks)):
                drawn, base = [], image
            base = tint(base, masks[len(drawn):], cols[len(drawn):])
            self._tinted = (self.image_sha, masks, base)
        anchors = [self._anchor(r.number, m) for r, m in zip(regions, masks)]
        # labels at 1/24 of the shorter side: still readable when the page shows the image scaled down
        return annotate(Image.fromarray(base), anchors, [f"{r.number} {r.concept}" for r in regions], cols,
                        size=max(14, min(image.shape[:2]) // 24))

    def export(self) -> list[dict]:
        """The conversation as fine-tuning records (LLaVA/Bunny JSON), from the store."""
        return self._store().export_llava(self.owner, self.id)

    def rename(self, title: str) -> None:
        """Set the title (in the store too, when there is one); a blank title is refused."""
        title = (title or "").strip()
        if not title:
            raise ConversationError("a title cannot be empty")
        if self.bot.store is not None:
            self.bot.store.rename(self.owner, self.id, title)
        self.title = title

    def delete(self) -> None:
        """Forget the conversation: in the store, and every cache that holds part of it."""
        self._store().delete(self.owner, self.id)
        self.bot.forget(self)

    # ------------------------------------------------------------------------------------- image, regions
    def set_image(self, image: ImageSource) -> str:
        """Make `image` the conversation's current image (later turns refer to it); returns its content key."""
        image = decode_image(image, self.bot.predictor.max_pixels)  # once: the encoder and the store share it
        key, sha = self.bot.encode_image(image, self.owner)
        with self.lock:
            if key != self.image_key:
                self.new_regions.clear()
            self.image_key, self.image_sha = key, sha
        self.bot.warm(self)  # the image's prompt start is computed while the user clicks or types
        return key

    def add_region(self, prompt: Prompt) -> Region:
        """Segment, label and caption a region of the current image; it gets the next `<regionN>` id."""
        return self.keep(self._segment(prompt))

    def find(self, query: str, **options: Any) -> list[Region]:
        """Every instance of the concepts `query` names ("cars", "cars and people") on the current image, as regions
        of the chat, best first: numbered like clicked ones; an instance already a region keeps its number.

        `options` go to `TapPredictor.find` (min_score, max_instances, ...).
        """
        if self.image_key is None:
            raise ConversationError("add an image before finding")
        found = self.bot.find(self, query, **options)
        with self.lock:
            known = [r for r in self.current_regions() if r.kind == "region"]
        out = []
        for region in found:
            same = next((r for r in known if r.box == region.box and r.concept == region.concept), None)
            region.kind = "region"
            out.append(same or self.keep(region))
        return out

    def refine_region(self, number: int, prompt: Prompt) -> Region:
        """Re-segment a region with a new prompt (say, plus a negative point), keeping its number.

        Only regions no question has used yet: a sent turn's grounding lines are frozen.
        """
        with self.lock:
            self.live_region(number)
            if number not in self.new_regions:
                raise ConversationError(f"<region{number}> was already used in a question; add a new region instead")
        region = self._segment(prompt)
        region.number = number
        with self.lock:
            if self.bot.store is not None:
                self.bot.store.update_region(self.owner, self.id, region, image_sha=self.image_sha)
            self.regions[number] = region
        return region

    def click(self, x: float, y: float, positive: bool = True) -> Region:
        """A positive click is a new region; a negative one carves the latest region no question has used yet."""
        if positive:
            return self.add_region(Prompt.point(x, y))
        latest = next((n for n in reversed(self.new_regions) if not self.regions[n].removed), None)
        if latest is None:
            raise ConversationError("a negative point refines the region you just added: click a positive point "
                                    "first")
        old = self.regions[latest].prompt
        return self.refine_region(latest, Prompt(old.points + ((x, y),), old.labels + (0,), old.box,
                                                 kind=old.kind or "point"))

    def remove_region(self, number: int) -> None:
        """Mark a region removed: its number is never reused, and turns that used it stay in the history."""
        with self.lock:
            if number not in self.regions:
                raise ConversationError(f"unknown region <region{number}>")
            if self.bot.store is not None:
                self.bot.store.remove_region(self.owner, self.id, number)
            self.regions[number].removed = True
            if number in self.new_regions:
                self.new_regions.remove(number)

    def candidates(self, max_regions: int = 16, **options: Any) -> list[Region]:
        """TAP's segment-everything regions of the current image (masks included), best first; kept as this
        session's candidates until the image changes (`adopt` turns one into a region)."""
        if self.image_key is None:
            raise ConversationError("add an image first")
        found = self.bot.segment_everything(self, max_regions, **options)
        for rank, region in enumerate(found, 1):
            region.number = rank  # the candidate's number in this list, until adopted
        self.candidates_found = (self.image_key, found)
        return found

    def current_candidates(self) -> list[Region] | None:
        """The candidates found for the current image, or None when there are none."""
        key, found = self.candidates_found
        return found if key is not None and key == self.image_key else None

    def adopt(self, index: int) -> Region:
        """Make segment-everything candidate `index` (1-based) a region of the chat."""
        found = self.current_candidates()
        if found is None:
            raise ConversationError("find the candidates first (segment everything)")
        if not 1 <= index <= len(found):
            raise ConversationError(f"there is no candidate {index}; pick one of 1-{len(found)}")
        p = found[index - 1].prompt
        return self.add_region(Prompt(p.points, p.labels, p.box, kind="everything"))

    # ------------------------------------------------------------------------------------------ answering
    def ask(self, text: str, settings: GenerationSettings | None = None, find: bool | None = None) -> Reply:
        """Answer `text` and return the finished `Reply` (blocks; `stream` gives the pieces as they come)."""
        stream = self.stream(text, settings, find=find)
        stream.text()
        return stream.reply

    def stream(self, text: str, settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, find: bool | None = None) -> ReplyStream:
        """Start answering; validation errors raise here, before anything is stored. One answer at a time.

        `find`: ground the concepts the question names with every instance TAP finds (they become regions of the
        chat); None follows the model (`ChatConfig.finds`), False keeps a benchmark's prompt as the paper's.
        """
        settings = settings or GenerationSettings()
        cancel = cancel or threading.Event()
        text = clean_message(text)
        grounded, found = self.grounding(text, self.bot.config.finds if find is None else find)
        visual = self.bot.mode == "tapchat" and self.image_key is not None
        plan = plan_prompt(self.turns, self.image_key, text, grounded, visual=visual, count=self.bot.count,
                           max_context=self.bot.config.max_context, max_new_tokens=settings.max_new_tokens,
                           found=found)
        reply = Reply(dropped_turns=plan.dropped_turns, regions=plan.region_numbers)
        run = GenerationSettings(**{**settings.to_dict(), "max_new_tokens": plan.max_new_tokens})
        return ReplyStream(self._generate(text, plan, run, settings, reply, cancel, visual), reply, cancel)

    @property
    def answering(self) -> bool:
        """True while an answer is being written in this chat (a second answer or an `undo` is refused meanwhile)."""
        return self._running is not None

    def stop(self) -> bool:
        """Stop the answer being written (it keeps what was said); False when nothing was running."""
        cancel = self._running
        if cancel is None or cancel.is_set():
            return False
        cancel.set()
        return True

    def replay(self, text: str, answer: str, complete: bool = True, find: bool | None = None) -> None:
        """Record an earlier exchange as a finished turn, its prompt built exactly as `stream` builds it."""
        text = clean_message(text)
        prompt = user_prompt(text, *self.grounding(text, self.bot.config.finds if find is None else find))
        with self.lock:
            self.turns.append(Turn(prompt, answer.strip(), text, self.image_key, self.turn_regions(text), complete))
            self.new_regions.clear()

    def undo(self, turns: int = 1) -> list[Turn]:
        """Forget the last `turns` questions and answers (in the store too); their regions count as new again."""
        with self.lock:
            if self._running is not None:
                raise ConversationError("an answer is still being written: stop it first")
            if turns < 1 or not self.turns:
                raise ConversationError("there is nothing to undo")
            keep = max(0, len(self.turns) - turns)
            gone = self.turns[keep:]
            if self.bot.store is not None:
                users = [m for m in self.bot.store.get_conversation(self.owner, self.id).messages if m.role == "user"]
                if keep < len(users):
                    self.bot.store.truncate(self.owner, self.id, users[keep].idx)
            del self.turns[keep:]
            live = {r.number for r in self.current_regions()}
            back = {n for t in gone for n in t.regions if n in live}
            self.new_regions[:] = sorted(set(self.new_regions) | back)
        self.bot.warmup.drop(self.id)
        return gone

    def clear(self) -> None:
        """Forget every question and answer; the image and regions stay."""
        if self.turns:
            self.undo(len(self.turns))

    # ------------------------------------------------------------------------------------------- internals
    def _anchor(self, number: int, mask: np.ndarray) -> tuple[int, int] | None:
        """Where a region's label goes, kept while its mask is the same array."""
        cached = self._anchors.get(number)
        if cached is None or cached[0] is not mask:
            cached = self._anchors[number] = (mask, anchor(mask))
        return cached[1]

    def _store(self):
        if self.bot.store is None:
            raise ConversationError("no history store is attached")
        return self.bot.store

    def grounding(self, text: str, find: bool) -> tuple[list[Region], dict[str, int] | None]:
        """The regions a turn carries: its own, with `find` every instance of each concept the text names (and the
        count per concept: `found`, None when it names none), or the scene's when it has neither."""
        with self.lock:
            numbers = self.turn_regions(text)
            stale = [n for n in numbers if self.regions[n].image != self.image_key]
            if stale:
                raise ConversationError(f"<region{stale[0]}> belongs to an earlier image; add it again on this one")
            grounded = [self.regions[n] for n in numbers]
        return self.add_found(text, grounded, find)

    def add_found(self, text: str, grounded: list[Region], find: bool) -> tuple[list[Region], dict[str, int] | None]:
        """`grounded` plus, with `find`, every instance of each concept `text` names (and the counts; None when it
        names none), or the scene's regions when there is nothing to ground in."""
        concepts = self.bot.concepts_in(text) if find and self.image_key is not None else []
        found = {concept: self.find(concept) for concept in concepts}
        for instances in found.values():
            grounded += [r for r in instances if r.number not in {g.number for g in grounded}]
        if not grounded and not found and self.image_key is not None:
            grounded = self.bot.scene_regions(self)
        return grounded, {concept: len(instances) for concept, instances in found.items()} or None

    def keep(self, region: Region) -> Region:
        """Number a new region of the current image (in the store too); the next turn carries it."""
        with self.lock:
            region.number, region.image = self.next_number(), self.image_key
            if self.bot.store is not None:
                region.number = self.bot.store.add_region(self.owner, self.id, region, image_sha=self.image_sha)
            self.regions[region.number] = region
            self.new_regions.append(region.number)
        return region

    def _segment(self, prompt: Prompt) -> Region:
        """TAP's region for `prompt` on the current image (not yet numbered)."""
        if self.image_key is None:
            raise ConversationError("add an image before adding regions")
        if not isinstance(prompt, Prompt):
            raise ConversationError("a region needs a Prompt (point, box or scribble)")
        region = self.bot.predict(self, prompt)
        if not region.mask.any():
            raise ConversationError("TAP found no region there; try another point or a box")
        region.image = self.image_key
        return region

    def _begin_turn(self, text: str, plan, settings: GenerationSettings) -> Turn:
        store = self.bot.store
        with self.lock:
            turn = Turn(plan.user_prompt, "", text, self.image_key, plan.region_numbers, complete=False)
            self.turns.append(turn)
            self.new_regions.clear()
            if store is not None:
                store.append_message(self.owner, self.id, "user", text, prompt=plan.user_prompt,
                                     image_sha=self.image_sha, regions=plan.region_numbers)
                turn.message_id = store.append_message(
                    self.owner, self.id, "assistant", "", image_sha=self.image_sha, regions=plan.region_numbers,
                    model=self.bot.model_id, settings=settings.to_dict(), complete=False)
        return turn

    def _generate(self, text, plan, run, settings, reply: Reply, cancel, visual) -> Iterator[str]:
        """Write the answer as the decode loop produces it: pieces out, periodic saves, the KV prefix kept."""
        with self.lock:
            if self._running is not None:
                raise ConversationError("an answer is already being written in this chat")
            self._running = cancel
        try:
            turn = self._begin_turn(text, plan, settings)
        except BaseException:
            self._running = None
            raise
        bot, store = self.bot, self.bot.store
        ids: list[int] = []
        emitted, saved_at, start = "", time.monotonic(), time.monotonic()
        try:
            request = bot.prepare(self, plan.text, visual, run, cancel)
            reply.prompt_tokens = bot.chat.prompt_length(request.ids)
            for event in bot.decode([request]):
                if reply.first_token_s is None:
                    reply.first_token_s = time.monotonic() - start
                    reply.reused_tokens = request.prefix.reused if request.prefix is not None else 0
                if isinstance(event, End):
                    reply.complete = event.reason != "cancelled"
                    if event.prefix is not None:
                        bot.warmup.keep(self, event.prefix)
                    break
                ids.append(event.token)
                piece = bot.new_text(ids, emitted)
                if piece:
                    emitted += piece
                    turn.answer = emitted
                    yield piece
                if store is not None and time.monotonic() - saved_at > SAVE_EVERY_S:
                    store.update_message(self.owner, turn.message_id, emitted.strip(), complete=False)
                    saved_at = time.monotonic()
        except GeneratorExit:  # the caller stopped reading: keep what was said, marked incomplete
            self._finish(turn, reply, ids)
            raise
        except Exception as exc:
            bot.warmup.drop(self.id)
            self._finish(turn, reply, ids)
            cause = str(exc) if isinstance(exc, ServerError) else \
                f"the model failed while answering ({type(exc).__name__}: {exc})"
            raise GenerationError(f"{cause}; the partial answer was kept") from exc
        reply.cancelled = cancel.is_set() and not reply.complete
        reply.total_s = time.monotonic() - start
        self._finish(turn, reply, ids, plan.regions)

    def _finish(self, turn: Turn, reply: Reply, ids: list[int], grounded: Sequence[Region] = ()) -> None:
        """Record the answer (complete or not) in the reply, the conversation and the store; a complete one is
        checked against what TAP says of the regions it cites (`grounded`: those the turn carries)."""
        self._running = None
        reply.new_tokens = len(ids)
        reply.text = turn.answer = self.bot.chat.tokenizer.decode(ids, skip_special_tokens=True).strip()
        turn.complete = reply.complete
        if reply.complete:
            reply.note = turn.note = self.check(reply.text, grounded)
        if self.bot.store is not None and turn.message_id is not None:
            self.bot.store.update_message(self.owner, turn.message_id, reply.text, complete=reply.complete,
                                          note=turn.note or None)

    def check(self, answer: str, grounded: Sequence[Region] = ()) -> str:
        """The answer check's note ("" when all agrees) for `answer`, against the turn's regions and the current
        image's others; it sits beside the answer and never enters a prompt."""
        regions = {r.ref: r for r in [*self.current_regions(), *grounded]}
        names = self.bot.predictor.model.concept_projector.names
        return "; ".join(check_answer(answer, regions.values(), names))

