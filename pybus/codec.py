"""Messages as bytes, for transports: stable names and a JSON encoding.

A routed message crosses processes as a name and a JSON body. The name is
`module.QualifiedName` unless the route gives another (`dp.route(OrderPaid,
name="orders.paid")`), so renaming a module does not have to break a running
system. Bodies are encoded by msgspec (dataclasses, msgspec structs, attrs
classes and plain types) or by pydantic for pydantic models; a string message
is its own name with an empty body.

Install with the `transport` extra (`pybus-cqrs[transport]`): msgspec is not a
dependency of the core.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from pybus.errors import DecodeError, ImproperlyConfigured, key_name, message_key


def default_name(key: object) -> str:
    """The name a message key travels under unless its route names it.

    A class defined in a script run directly lives in module `__main__`, a name
    that a process importing the same file never sees: its default name is its
    module's import name when the script was run with `python -m` (Python keeps
    it in `__main__.__spec__`), and otherwise there is none, so
    `ImproperlyConfigured` asks for `name=`.
    """
    if isinstance(key, str):
        return key
    assert isinstance(key, type)  # routes are classes or strings
    module = key.__module__
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is None or not spec.name or spec.name == "__main__":
            raise ImproperlyConfigured(
                f"Cannot route {key.__qualname__} under a default name: it is defined in a script run "
                "directly (module __main__), and a process that imports that file knows it under another "
                f"module name, so the names would never match. Pass one: dp.route({key.__qualname__}, "
                f'name="{key.__qualname__.lower()}"), or define the class in a module you import'
            )
        module = spec.name
    return f"{module}.{key.__qualname__}"


class JsonCodec:
    """Encodes and decodes the messages of a fixed set of routes."""

    def __init__(self, names: dict[object, str]) -> None:
        try:
            import msgspec
        except ImportError as exc:  # pragma: no cover - the extra is installed in CI
            raise ImproperlyConfigured(
                "Routing messages to a transport needs msgspec: install pybus-cqrs[transport] "
                "(or pybus-cqrs[redis])"
            ) from exc
        self._msgspec = msgspec
        self._encoder = msgspec.json.Encoder()
        self.names = dict(names)
        self.keys: dict[str, object] = {}
        self._decoders: dict[str, Callable[[bytes], object]] = {}
        for key, name in self.names.items():
            self._decoders[name] = self._decoder(key)
            other = self.keys.setdefault(name, key)
            if other is not key:
                raise ImproperlyConfigured(
                    f"{key_name(key)} and {key_name(other)} are both routed as {name!r}; "
                    "give one of them another name with dp.route(..., name=...)"
                )

    def name_of(self, message: object) -> str:
        return self.names[message_key(message)]

    def encode(self, message: object) -> bytes:
        """The body of `message` (empty for a string message)."""
        if isinstance(message, str):
            return b""
        model_dump = getattr(message, "model_dump", None)
        data: Any = model_dump(mode="json") if callable(model_dump) else message
        try:
            return bytes(self._encoder.encode(data))
        except TypeError as exc:
            raise ImproperlyConfigured(
                f"Cannot encode {key_name(type(message))} for a transport: {exc}; a routed message "
                "must be a dataclass, a msgspec struct, a pydantic model or another JSON-able type"
            ) from exc

    def decode(self, name: str, body: bytes) -> object:
        """The message named `name`; `DecodeError` if the name or the body does not fit."""
        decoder = self._decoders.get(name)
        if decoder is None:
            raise DecodeError(name, "no route of this process has that name")
        try:
            return decoder(body)
        except Exception as exc:
            raise DecodeError(name, f"{type(exc).__name__}: {exc}") from exc

    def _decoder(self, key: object) -> Callable[[bytes], object]:
        """How to turn a body into a message of `key`, decided once per route."""
        if isinstance(key, str):
            return lambda body: key
        model_validate_json: Callable[[bytes], object] | None = getattr(key, "model_validate_json", None)
        if callable(model_validate_json):
            return model_validate_json
        decoder: Callable[[bytes], object] = self._msgspec.json.Decoder(type=key).decode
        return decoder
