"""The dead letters of the Redis Streams transport: list, look up, requeue, purge.

`RedisTransport.dead_letter` keeps each one as an entry of the stream `{prefix}dead`
(one stream for every group): the message's own fields (`i`, `h`, `b`), `reason`
(what the consumer gave: for a failed handling, the attempts, the error and its
full traceback), `error` (the error on one line, see `error_line`), `attempt`,
the `stream` and `entry_id` it came from, and the `group` that gave up on it.

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
# The first line the consumer writes for a failed handling; its exception's message follows.
_FAILED = re.compile(r"failed \d+ times; last error: ([^\s:]+): ")
_TRACEBACK = "Traceback (most recent call last):"
_GROUP = f"Exception Group {_TRACEBACK}"
_CHAINED = (
    "The above exception was the direct cause of the following exception:",
    "During handling of the above exception, another exception occurred:",
)
# What pybus notes on an event handler's error (pybus.engines): not part of its message.
_PYBUS_NOTE = re.compile(
    r"raised by .+ handling event \S+|\d+ other handler\(s\) failed at the same level: .*"
    r"|delivery \d+ of \S+ \(message id .*\)"
)


def error_line(reason: str) -> str:
    """The error's type and message in a dead letter's reason, on one line (`ValueError: bad
    amount`; a message of several lines has its line breaks shown as `\n`).

    For a failed handling (the reason starts `failed N times; last error: <Type>:
    <message>` and the traceback follows): that type and message, told apart from the
    traceback by the copy of the message that ends it, so no text in the message can be
    taken for the traceback; for an exception group (an event's handlers failed), its
    members' errors joined with "; ". For another reason: the exception line(s) of the
    traceback in it, if any (the outermost exception's, notes left out); else its first
    line.
    """
    failed = _FAILED.match(reason)
    if failed is not None:
        message, drawn = _message(reason[failed.end() :])
        last = _last_part(drawn.splitlines())
        if last[:1] == [f"  + {_GROUP}"]:
            members = _members(last[1:], 2)
            if members:
                return "; ".join(members)
        return _one_line(f"{failed.group(1)}: {message}".removesuffix(": "))
    lines = reason.splitlines()
    for index, line in enumerate(lines):
        if line in (_TRACEBACK, f"  + {_GROUP}"):
            last = _last_part(lines[index:])
            found = _members(last[1:], 2) if last[:1] == [f"  + {_GROUP}"] else _member(last)
            if found:
                return "; ".join(found)
            break
    return next((line for line in lines if line.strip()), "")


def _message(text: str) -> tuple[str, str]:
    """(message, traceback) of "<message>\n<traceback>", where the traceback ends with the
    exception's line, ": <message>", and its notes: the longest message that fits."""
    ends = [index for index, char in enumerate(text) if char == "\n"]
    for end in reversed(ends):
        message = text[:end]
        if f": {message}\n" in text[end + 1 :]:
            return message, text[end + 1 :]
    end = text.find("\n")
    return (text, "") if end < 0 else (text[:end], text[end + 1 :])


def _last_part(lines: list[str]) -> list[str]:
    """The outermost exception's part of a traceback drawn with its causes or contexts."""
    for index in range(len(lines) - 2, 0, -1):
        if lines[index] in _CHAINED and not lines[index - 1] and not lines[index + 1]:
            return lines[index + 2 :]
    return lines


def _members(lines: list[str], column: int) -> list[str]:
    """The errors of the members of an exception group drawn at `column` (its own lines
    and the first member's marker there; the members' lines two further, after "| ")."""
    inner, sections = " " * (column + 2), []
    section: list[str] | None = None
    for line in lines:
        if line.startswith(" " * column + "+-+") or re.fullmatch(rf"{inner}\+-+( \d+ -+)?", line):
            section = []
            sections.append(section)
        elif section is not None and line.startswith(inner):
            text = line.removeprefix(inner)
            section.append(text.removeprefix("| ") if text.startswith("|") else text)
    return [error for section in sections if section for error in _member(section)]


def _member(lines: list[str]) -> list[str]:
    """The errors of one member of a group, drawn at column 0 (a group of its own: its members')."""
    last = _last_part(lines)
    if last[:1] == [_GROUP]:
        return _members(last[1:], 0)
    if last[:1] == [_TRACEBACK]:
        last = last[1:]
        while last and last[0].startswith("  "):  # the frames
            last = last[1:]
    while last and (not last[-1].strip() or _PYBUS_NOTE.fullmatch(last[-1])):
        last = last[:-1]
    if not last or (last[0].startswith("and ") and last[0].endswith(" more exceptions")):
        return []
    return [_one_line("\n".join(last))]


def _one_line(text: str) -> str:
    return text.strip().replace("\r\n", "\n").replace("\n", "\\n")


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
    stored_error: str | None = None

    @property
    def error(self) -> str:
        """The error's type and message, on one line: as stored when it was dead-lettered
        (see `error_line`), or read from `reason` for a letter stored without it."""
        return self.stored_error if self.stored_error is not None else error_line(self.reason)


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
        error = fields.get(b"error")
        return RedisDeadLetter(
            entry_id.decode(),
            envelope,
            reason,
            fields.get(b"group", b"").decode(),
            None if error is None else error.decode(errors="replace"),
        )

    async def aclose(self) -> None:
        """Close the connection."""
        await self.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
