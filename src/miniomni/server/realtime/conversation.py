"""A Realtime session's conversation: the items it remembers, the latest user turn, and the item events.

Mini-Omni answers the latest user turn alone, so the conversation is a record of what was said
(for transcripts, truncation, retrieval and deletion), not a context fed to the model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine import AnswerJob
from ..turns.taking import TurnEnded
from .context import SessionContext
from .formats import InputConverter, OutputConverter
from .protocol import (
    ClientError,
    ResponseIds,
    UserInput,
    decode_pcm16,
    parse_message,
    pcm16_to_float,
    user_audio_item,
)

MAX_ITEMS = 256  # items remembered per connection (the oldest go first)


@dataclass
class Response(ResponseIds):
    """A running response: its ids, the engine job answering it, the text so far."""

    job: AnswerJob | None = None
    encoder: OutputConverter | None = None  # its audio in the session's output format
    text: list[str] = field(default_factory=list)
    finished: bool = False
    user_item_id: str | None = None  # the user's turn it answers (and transcribes, when asked)
    audio_samples: int = 0  # audio sent so far


@dataclass
class ItemRecord:
    """What the session remembers of a conversation item (for transcripts, truncation and retrieval)."""

    role: str
    transcript: str | None = None
    audio_ms: int = 0  # an assistant item's audio
    response: Response | None = None
    item: dict[str, Any] | None = None  # a user item as it was announced

    def as_item(self, item_id: str) -> dict[str, Any]:
        """The item as ``conversation.item.retrieve`` gives it back now."""
        if self.response is not None:
            return self.response.item("completed" if self.response.finished else "in_progress", self.transcript)
        if self.item is not None and self.item["content"][0].get("type") != "input_audio":
            return self.item
        return user_audio_item(item_id, self.transcript)


def _unknown(item_id: Any, code: str) -> ClientError:
    return ClientError(f"item {item_id!r} is not in this conversation (or is one of the oldest, no longer kept: the "
                       f"last {MAX_ITEMS} are)", code=code, param="item_id")


class Conversation:
    """The items of one session. ``running()`` is the response being answered now, if any."""

    def __init__(self, session: SessionContext, running: Callable[[], Response | None]) -> None:
        self.session = session
        self.running = running
        self.items: OrderedDict[str, ItemRecord] = OrderedDict()
        self.last_user: UserInput | None = None
        self.last_item_id: str | None = None

    def remember(self, item_id: str, record: ItemRecord) -> None:
        self.items[item_id] = record
        while len(self.items) > MAX_ITEMS:
            self.items.popitem(last=False)

    def announce_item(self, item: dict[str, Any], done: bool = True) -> None:
        """``conversation.item.added`` (and ``.done`` unless the item is still being written)."""
        previous, self.last_item_id = self.last_item_id, item["id"]
        self.session.send({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        if done:
            self.session.send({"type": "conversation.item.done", "previous_item_id": previous, "item": item})

    def add_user_audio(self, turn: TurnEnded) -> UserInput:
        """A committed spoken turn becomes the latest user turn (``input_audio_buffer.committed``, the item)."""
        previous = self.last_item_id
        self.last_user = UserInput(turn.item_id, audio=pcm16_to_float(turn.pcm), pcm=turn.pcm)
        self.session.send({"type": "input_audio_buffer.committed", "item_id": turn.item_id,
                           "previous_item_id": previous})
        self.remember(turn.item_id, ItemRecord("user"))
        self.announce_item(user_audio_item(turn.item_id))
        return self.last_user

    # ------------------------------------------------------------------ items sent by the client

    def parse_message(self, item: Any, param: str) -> tuple[UserInput | None, dict[str, Any]]:
        session = self.session
        return parse_message(item, param, session.turns.max_buffer_bytes, session.settings.max_audio_seconds,
                             self.item_audio)

    def item_audio(self, data: Any, param: str) -> bytes:
        """An item's ``input_audio`` (base64, in the session's input format) as 24 kHz PCM."""
        fmt = self.session.config.input_format
        return InputConverter(fmt).to_pcm16(decode_pcm16(data, param, fmt))

    def input_item(self, item: Any, param: str) -> UserInput | None:
        """One item of ``response.input``: a message, or an ``item_reference`` to the latest user turn."""
        if isinstance(item, dict) and item.get("type") == "item_reference":
            wanted = item.get("id")
            if self.last_user is not None and wanted == self.last_user.item_id:
                return self.last_user
            known = "no user turn yet" if self.last_user is None else f"the latest is {self.last_user.item_id!r}"
            raise ClientError(f"{param}: an item_reference can name the latest user turn only ({known}); got "
                              f"{wanted!r}. Send other turns as message items", param=f"{param}.id")
        return self.parse_message(item, param)[0]

    async def on_item_create(self, event: dict[str, Any]) -> None:
        user, echoed = self.parse_message(event.get("item"), "item")
        if user is not None:
            self.last_user = user
        self.remember(echoed["id"], ItemRecord(echoed.get("role", "user"), item=echoed))
        self.announce_item(echoed)

    async def on_item_retrieve(self, event: dict[str, Any]) -> None:
        """The item as the server has it now (a user turn with its transcript, once there is one)."""
        item_id = event.get("item_id")
        record = self.items.get(item_id) if isinstance(item_id, str) else None
        if record is None:
            raise _unknown(item_id, "item_retrieve_invalid_item_id")
        self.session.send({"type": "conversation.item.retrieved", "item": record.as_item(item_id)})

    async def on_item_delete(self, event: dict[str, Any]) -> None:
        """Forget an item (an application editing its history); a turn being answered is refused, not cut."""
        item_id = event.get("item_id")
        record = self.items.get(item_id) if isinstance(item_id, str) else None
        if record is None:
            raise _unknown(item_id, "item_delete_invalid_item_id")
        running = self.running()
        if running is not None and not running.finished and item_id in (running.item_id, running.user_item_id):
            raise ClientError(f"item {item_id!r} is being answered now; send response.cancel first, then delete it",
                              code="item_delete_in_progress", param="item_id")
        del self.items[item_id]
        if self.last_user is not None and self.last_user.item_id == item_id:
            self.last_user = None  # a deleted turn is not answered by a later response.create
        if self.last_item_id == item_id:
            self.last_item_id = next(reversed(self.items), None)
        self.session.send({"type": "conversation.item.deleted", "item_id": item_id})
