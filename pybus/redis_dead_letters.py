"""The dead letters of the Redis Streams transport: list, look up, requeue, purge.

`RedisTransport.dead_letter` keeps each one as an entry of the stream `{prefix}dead`
(one stream for every group): the message's own fields (`i`, `h`, `b`), `reason`
(what the consumer gave: for a failed handling, the attempts, the error and its
full traceback), `attempt`, the `stream` and `entry_id` it came from, and the
`group` that gave up on it.

    async with RedisDeadLetters.of(transport) as dead:
        for letter in await dead.letters():
            print(letter.id, letter.envelope.name, letter.error)
        await dead.requeue(letter.id)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from redis.exceptions import RedisError

from pybus import redis_wire as wire
from pybus.errors import TransportError
from pybus.transport import Envelope

if TYPE_CHECKING:
    from pybus.redis_streams import RedisTransport

# Sends dead letter ARGV[1] of KEYS[1] again as a new entry of its stream KEYS[2], for
# its group only (field g), and deletes it: one atomic step, so it is never both
# requeued and kept, nor neither. Returns the new entry id, or nil without the letter.
_REQUEUE = """
local found = redis.call("XRANGE", KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return false end
local fields, letter = found[1][2], {}
for n = 1, #fields, 2 do letter[fields[n]] = fields[n + 1] end
if letter["stream"] ~= KEYS[2] then return redis.error_reply("the dead letter came from another stream") end
local entry = {"i", letter["i"] or "", "h", letter["h"] or "", "b", letter["b"] or ""}
if letter["group"] then
    entry[#entry + 1] = "g"
    entry[#entry + 1] = letter["group"]
end
local id = redis.call("XADD", KEYS[2], "*", unpack(entry))
redis.call("XDEL", KEYS[1], ARGV[1])
return id
"""

_ENTRY_ID = re.compile(r"\d+-\d+")
_TRACEBACK = "Traceback (most recent call last):"
_GROUP_TRACEBACK = f"  + Exception Group {_TRACEBACK}"
_MEMBER = re.compile(r"\s*\+[-+]*-* ?(\d+ )?-+")  # "+-+---- 1 ----", "+---- 2 ----", "+--------"


def error_line(reason: str) -> str:
    """The error's type and message in a dead letter's reason (`ValueError: bad amount`):
    the exception line of the outermost traceback in it; for an exception group, those of
    its members, joined with "; "; with no traceback, the reason's first line."""
    lines = reason.splitlines()
    return "; ".join(_errors(lines, "")) or next((line for line in lines if line.strip()), "")


def _errors(lines: list[str], margin: str) -> list[str]:
    """The exception lines of the outermost exception of a traceback drawn at `margin`."""
    header = None
    for index, line in enumerate(lines):
        text = line.removeprefix(margin)
        if not line.startswith(margin) or (text[:1].isspace() and not text.startswith(_GROUP_TRACEBACK)):
            continue  # a line of a nested traceback
        if text.endswith(_GROUP_TRACEBACK):
            header = (index, True)
        elif text.endswith(_TRACEBACK):
            header = (index, False)
    rest = lines if header is None else lines[header[0] + 1 :]
    if header is None or not header[1]:
        own = (line.removeprefix(margin) for line in rest if line.startswith(margin))
        return [text for text in own if text and not text[:1].isspace()][:1]
    members: list[str] = []
    section: list[str] | None = None
    for line in [*rest, ""]:
        if _MEMBER.fullmatch(line) or (section is not None and not line.strip()):
            if section:
                members.extend(_errors(section, margin + "    | "))
            section = [] if line.strip() else None
        elif section is not None:
            section.append(line)
    return members or _errors(rest, margin + "  | ")


@dataclass(frozen=True, slots=True)
class RedisDeadLetter:
    """A dead letter as the dead-letter stream keeps it.

    `id` is its id in that stream (what `requeue` takes), `envelope` the message
    with the attempts it had, `reason` all the consumer gave (the traceback
    included), `group` the consumer group that gave up on it.
    """

    id: str
    envelope: Envelope
    reason: str
    group: str

    @property
    def error(self) -> str:
        """The error's type and message, on one line (see `error_line`)."""
        return error_line(self.reason)


class RedisDeadLetters:
    """The dead letters of every group under `prefix`, over a connection of their own.

    Build it from a transport with `RedisDeadLetters.of(transport)`; use it as an
    async context manager, or call `aclose()`. Every method raises `TransportError`
    when Redis cannot be reached or refuses, and when the dead letter asked for is
    not there.
    """

    def __init__(
        self, url: str = "redis://localhost:6379/0", *, prefix: str = "pybus:", timeout: float = 5.0
    ) -> None:
        self.prefix = prefix
        self.key = f"{prefix}dead"
        self.client = wire.connect(url, timeout=timeout, connect_timeout=timeout)
        self._requeue = self.client.register_script(_REQUEUE)

    @classmethod
    def of(cls, transport: RedisTransport) -> Self:
        """The dead letters of the server and prefix `transport` uses."""
        return cls(transport.url, prefix=transport.prefix, timeout=transport.timeout)

    async def letters(self, count: int = 100) -> list[RedisDeadLetter]:
        """The oldest `count` dead letters."""
        try:
            found = await self.client.xrange(self.key, "-", "+", count=count)
        except RedisError as exc:
            raise TransportError(f"Could not read the dead letters in {self.key}: {exc}") from exc
        return [self._letter(entry_id, fields) for entry_id, fields in found]

    async def get(self, dead_id: str) -> RedisDeadLetter:
        """The dead letter `dead_id`, looked up by its id (however many there are)."""
        if not _ENTRY_ID.fullmatch(dead_id):
            raise TransportError(
                f"No dead letter {dead_id!r} in {self.key}: dead letter ids look like 1712345678901-0, "
                "as `pybus dlq APP list` prints them"
            )
        try:
            found = await self.client.xrange(self.key, dead_id, dead_id)
        except RedisError as exc:
            raise TransportError(f"Could not read the dead letters in {self.key}: {exc}") from exc
        if not found:
            raise TransportError(f"No dead letter {dead_id!r} in {self.key}")
        return self._letter(*found[0])

    async def requeue(self, dead_id: str) -> str:
        """Send dead letter `dead_id` again, attempts starting over, as a new entry of its
        stream that only its group handles (the other groups had handled it), and remove
        it from the dead letters, in one atomic step. Returns the new entry's id."""
        stream, _ = wire.receipt((await self.get(dead_id)).envelope)
        try:
            entry = await self._requeue(keys=[self.key, stream], args=[dead_id])
        except RedisError as exc:
            raise TransportError(
                f"Could not requeue dead letter {dead_id} of {self.key}: {exc}; a requeue is one atomic "
                "step, so either it was sent again and removed from the dead letters, or neither"
            ) from exc
        if entry is None:  # requeued or purged by someone else since it was looked up
            raise TransportError(f"No dead letter {dead_id!r} in {self.key}")
        return str(entry.decode())

    async def purge(self) -> int:
        """Delete every dead letter; return how many there were."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xlen(self.key)
                pipe.delete(self.key)
                count, _ = await pipe.execute()
        except RedisError as exc:
            raise TransportError(f"Could not purge the dead letters in {self.key}: {exc}") from exc
        return int(count)

    def _letter(self, entry_id: bytes, fields: dict[bytes, bytes]) -> RedisDeadLetter:
        stream = fields.get(b"stream", b"").decode()
        attempt = int(fields.get(b"attempt", b"1"))
        envelope = wire.entry_envelope(
            stream, self.prefix, fields.get(b"entry_id", entry_id), fields, attempt
        )
        reason = fields.get(b"reason", b"").decode(errors="replace")
        return RedisDeadLetter(entry_id.decode(), envelope, reason, fields.get(b"group", b"").decode())

    async def aclose(self) -> None:
        """Close the connection."""
        await self.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
