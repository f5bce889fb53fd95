"""Factories without an exit stack: the per-handling providers' fast path.

The general per-handling scope (`handlers._scoped_plan`) resolves every provider
through the dispatcher's `Resolver` into an `AsyncExitStack`: about 3 µs a
handling. Most Factories need none of that. For a function handler whose
injected values are Factories of plain values, Singletons and ready values,
this module writes the call out:

- Factories without a teardown (sync functions and classes) only: a plain call
  that makes each value in the order they were bound and returns the handler's
  coroutine. A Factory's failure raises out of the call, which the engines make
  inside their own coroutine, as on the general path. A value that turns out to
  be awaitable is awaited, and the rest made after it, by a coroutine.
- the same, with one more Factory bound after them that is async or has a
  teardown (a sync or async generator): a coroutine that enters it with
  `with`/`async with`, the context managers the general path's exit stack enters.

Every other shape (a Factory of providers, two Factories with teardowns, a
handler class), and every handling while an override is in force or a Singleton
is not made yet, goes through the general scope, handed over as `general`. Each
failure gets the provider's note, and a unit of work from a Factory that did not
declare it is refused, as on the general path.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

from pybus.providers import (
    _MISSING,
    Factory,
    Provider,
    Resolver,
    Singleton,
    _AsyncGeneratorProvider,
    enter_generator,
    leave_generator,
    noted,
)
from pybus.unit_of_work import UnitOfWork

Made = tuple[str, Factory, Callable[[], Any]]


def in_order(func: Callable[..., Any], names: list[str]) -> bool:
    """Does `func` take exactly (message, *names), every one by position or keyword?
    Then the values can be passed by position, which costs less than by keyword. The
    signature read is the one of what is called: a decorator's wrapper, not the function
    its `__wrapped__` names (a `wrapper(*args, **kwargs)` may read its values by name)."""
    try:
        params = list(inspect.signature(func, follow_wrapped=False).parameters.values())
    except (TypeError, ValueError):
        return False
    return [param.name for param in params[1:]] == names and all(
        param.kind is param.POSITIONAL_OR_KEYWORD for param in params
    )


def _maker(factory: Factory) -> Callable[[], Any]:
    """The Factory's callable with its values bound: a call without arguments."""
    return functools.partial(factory.factory, **factory.kwargs) if factory.kwargs else factory.factory


def factory_invoke(
    func: Callable[..., Any],
    bound: Mapping[str, object],
    resolver: Resolver,
    general: Callable[[Any], Any],
    refuse_unit: Callable[[UnitOfWork], None],
    is_async: bool,
) -> tuple[Callable[[Any], Any], bool] | None:
    """The written-out call of `func(message, **values)` and whether it returns what
    `func` returns (True) or is a coroutine of its own (False); None when the values
    need the general scope."""
    factories = [(name, value) for name, value in bound.items() if isinstance(value, Factory)]
    if any(
        isinstance(value, Provider) and not isinstance(value, Factory | Singleton) for value in bound.values()
    ):
        return None
    if any(isinstance(kwarg, Provider) for _, factory in factories for kwarg in factory.kwargs.values()):
        return None  # a Factory of providers
    entered = [name for name, factory in factories if factory.shape != "sync"]
    if len(entered) > 1 or (entered and entered[0] != factories[-1][0]):
        return None  # the general scope keeps the order of several entered values
    ready = {name: value for name, value in bound.items() if not isinstance(value, Provider)}
    if any(isinstance(value, UnitOfWork) for value in ready.values()):
        return None  # refused by the general scope
    singletons = [(name, value.identity) for name, value in bound.items() if isinstance(value, Singleton)]
    template = {name: None if isinstance(value, Provider) else value for name, value in bound.items()}
    made: list[Made] = [
        (name, factory, _maker(factory)) for name, factory in factories if factory.shape == "sync"
    ]
    overrides = resolver.overrides
    instances = resolver.singletons
    plain_types: set[type] = set()  # classes of values seen not to be awaitable

    def values() -> dict[str, Any] | None:
        """The ready values and Singletons, or None when the general scope must make them."""
        if overrides:
            return None
        kwargs = dict(template)  # every name, in the order bound (as the general scope passes them)
        for name, identity in singletons:
            value = instances.get(identity, _MISSING)
            if value is _MISSING or isinstance(value, UnitOfWork):
                return None  # to be made, or a unit the general scope refuses
            kwargs[name] = value
        return kwargs

    def make(kwargs: dict[str, Any], start: int) -> int:
        """Make the sync Factories' values from `made[start]` on; the index of the first
        awaitable value, left in kwargs to await (len(made) when none is)."""
        for index in range(start, len(made)):
            name, provider, factory = made[index]
            try:
                value = factory()
            except Exception as exc:
                noted(exc, provider)
                raise
            kwargs[name] = value
            if value.__class__ not in plain_types and not plain(value):
                return index
        return len(made)

    def plain(value: Any) -> bool:
        """False for an awaitable; refuses a unit of work; remembers a plain value's class."""
        if inspect.isawaitable(value):
            return False
        if isinstance(value, UnitOfWork):
            refuse_unit(value)
        if value.__class__ is not types.GeneratorType:  # awaitable or not by its flags
            plain_types.add(value.__class__)
        return True

    async def rest(kwargs: dict[str, Any], index: int) -> None:
        """Await the awaitable value at `made[index]`, then make the rest."""
        while index < len(made):
            name, provider, _ = made[index]
            try:
                value = await kwargs[name]
            except Exception as exc:
                noted(exc, provider)
                raise
            if isinstance(value, UnitOfWork):
                refuse_unit(value)
            kwargs[name] = value
            index = make(kwargs, index + 1)

    async def awaiting(message: Any, kwargs: dict[str, Any], index: int) -> Any:
        await rest(kwargs, index)
        result = func(message, **kwargs)
        return (await result) if is_async else result

    if not entered and len(made) == 1 and not ready and not singletons:
        ((name, provider, factory),) = made

        second = in_order(func, [name])

        def invoke_one(message: Any) -> Any:
            """One Factory, nothing else: the common case, written out (its value passed by
            position when the handler takes it second, which costs less)."""
            if overrides:
                return general(message)
            try:
                value = factory()
            except Exception as exc:
                noted(exc, provider)
                raise
            if value.__class__ not in plain_types and not plain(value):
                return awaiting(message, {name: value}, 0)
            return func(message, value) if second else func(message, **{name: value})

        return invoke_one, True

    if not entered:

        def invoke(message: Any) -> Any:
            kwargs = values()
            if kwargs is None:
                return general(message)
            index = make(kwargs, 0)
            if index < len(made):
                return awaiting(message, kwargs, index)
            return func(message, **kwargs)

        return invoke, True

    name, last = factories[-1]
    make_last = _maker(last)
    alone = not made and not ready and not singletons
    second = alone and in_order(func, [name])

    async def invoke_entered(message: Any) -> Any:
        if alone:
            if overrides:
                return await general(message)
            kwargs: dict[str, Any] = {}
        else:
            found = values()
            if found is None:
                return await general(message)
            kwargs = found
            index = make(kwargs, 0)
            if index < len(made):
                await rest(kwargs, index)
        if last.shape == "generator":
            # What `with _GeneratorProvider(...)` does, without the context manager's calls.
            generator = make_last()
            value = enter_generator(last, generator)
            try:
                if value.__class__ not in plain_types:
                    plain(value)  # a generator's value is never awaited: only refuses a unit
                if second:
                    result = func(message, value)
                else:
                    kwargs[name] = value
                    result = func(message, **kwargs)
                if is_async:
                    result = await result
            except BaseException as exc:
                leave_generator(last, generator, exc)
                raise
            leave_generator(last, generator, None)
            return result
        if last.shape == "async generator":
            async with _AsyncGeneratorProvider(last, make_last()) as value:
                if value.__class__ not in plain_types:
                    plain(value)
                kwargs[name] = value
                result = func(message, **kwargs)
                return (await result) if is_async else result
        try:
            value = await make_last()
        except Exception as exc:
            noted(exc, last)
            raise
        if value.__class__ not in plain_types:
            plain(value)
        kwargs[name] = value
        result = func(message, **kwargs)
        return (await result) if is_async else result

    return invoke_entered, False
