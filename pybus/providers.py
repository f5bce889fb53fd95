"""Singleton and Factory: values injected into handlers, created when first needed.

A provider wraps a callable that makes a value: a sync or async function, or a
sync or async generator function whose code after `yield` is the teardown.
Bind a provider like any other value and the handler receives what it makes::

    @dp.queries.register(GetUser, repo=Singleton(make_repo), session=Factory(open_session))
    async def get_user(query: GetUser, repo: Repo, session: Session) -> User: ...

Nothing is called at import or registration. Each dispatcher resolves its
providers itself (a `Resolver`), inside the running event loop:

- a `Singleton` once per dispatcher, on first use, even when many handlings ask
  at the same moment; torn down at `dp.stop()`, in reverse creation order;
- a `Factory` for every handling, torn down right after that handling, also
  when the handler failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, Callable, Generator, Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any, ClassVar, Final, Literal

from pybus.errors import DispatcherClosed, ImproperlyConfigured, ProviderError

_MISSING: Final = object()

Shape = Literal["sync", "async", "generator", "async generator"]


class _LabelSyntax(type):
    """Gives the provider classes iambus's `Singleton["repo": get_repo]` syntax.

    A metaclass because a class subscript with a slice type-checks only through
    a metaclass `__getitem__` (mypy rejects it through `__class_getitem__`).
    """

    def __getitem__(cls, item: slice) -> Provider:
        """A provider labelled `item.start` that calls `item.stop`.

        Within one dispatcher, providers of the same class and label are one
        provider: they share a Singleton's instance.
        """
        if not isinstance(item, slice) or not isinstance(item.start, str) or item.step is not None:
            raise ImproperlyConfigured(
                f'{cls.__name__}[...] takes "label": callable, as in {cls.__name__}["repo": get_repo]'
            )
        provider: Provider = cls(item.stop)
        provider.label = item.start
        return provider


class Provider(metaclass=_LabelSyntax):
    """Base of `Singleton` and `Factory`: a callable and the values to call it with.

    The values may themselves be providers, resolved first:
    `Factory(open_session, engine=Singleton(make_engine))`. The call is checked
    against the callable's signature when the provider is made.
    """

    __slots__ = ("factory", "kwargs", "label", "shape")
    lifetime: ClassVar[str]

    def __init__(self, factory: Callable[..., Any], /, **kwargs: Any) -> None:
        if not callable(factory):
            raise ImproperlyConfigured(
                f"{type(self).__name__}() takes a callable that makes the value, not {factory!r}; "
                f"to inject a ready value, bind it directly"
            )
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as exc:
            raise ImproperlyConfigured(
                f"{type(self).__name__}({_name(factory)}) cannot call {_name(factory)} with the "
                f"values given ({exc}); pass every parameter without a default as a keyword"
            ) from exc
        except ValueError:  # no signature to check (some builtins): the call will tell
            pass
        self.factory = factory
        self.kwargs: Mapping[str, Any] = dict(kwargs)
        self.label: str | None = None
        self.shape: Shape = _shape(factory)

    @property
    def identity(self) -> object:
        """What resolution is keyed by: the (class, label) pair, or the provider itself."""
        return (type(self), self.label) if self.label is not None else self

    def __repr__(self) -> str:
        if self.label is not None:
            return f"{type(self).__name__}[{self.label!r}: {_name(self.factory)}]"
        return f"{type(self).__name__}({_name(self.factory)})"


class Singleton(Provider):
    """A value made once per dispatcher, on first use, and torn down at `dp.stop()`."""

    __slots__ = ()
    lifetime = "singleton"


class Factory(Provider):
    """A value made for every handling and torn down right after it."""

    __slots__ = ()
    lifetime = "factory"


def _name(factory: object) -> str:
    return getattr(factory, "__qualname__", None) or repr(factory)


def _shape(factory: Callable[..., Any]) -> Shape:
    if inspect.isasyncgenfunction(factory):
        return "async generator"
    if inspect.isgeneratorfunction(factory):
        return "generator"
    if inspect.iscoroutinefunction(factory):
        return "async"
    return "sync"


def providers_in(values: Mapping[str, Any]) -> Iterator[Provider]:
    """Every provider among `values`, and among their own values, depth first."""
    for value in values.values():
        if isinstance(value, Provider):
            yield value
            yield from providers_in(value.kwargs)


class Resolver:
    """Resolves the providers of one dispatcher and owns what they made.

    `singletons` maps a Singleton's identity to the value handlings get (its
    instance, or the value of an override in force); call plans read it
    directly, so a resolved Singleton costs one dict lookup.
    """

    def __init__(self, bind: Callable[[str], object]) -> None:
        #: Checks that Singletons are made in the dispatcher's event loop (and binds it).
        self._bind = bind
        self.singletons: dict[object, Any] = {}
        #: True once `aclose()` ran: no Singleton is made any more.
        self.closed = False
        self._instances: dict[object, Any] = {}  # what the Singletons made, whatever overrides say
        self._locks: dict[object, asyncio.Lock] = {}
        self.overrides: dict[object, list[tuple[Provider, Any]]] = {}  # in force, innermost last
        self._labels: dict[object, Provider] = {}
        self._scope = _SingletonScope()

    def adopt(self, values: Mapping[str, Any]) -> None:
        """Check the providers of a registration: one label, one callable.

        Raises `ImproperlyConfigured` when a label is reused with another callable.
        """
        for provider in providers_in(values):
            if provider.label is None:
                continue
            known = self._labels.setdefault(provider.identity, provider)
            if known.factory is not provider.factory:
                raise ImproperlyConfigured(
                    f"{provider!r} reuses the label {provider.label!r}, which this dispatcher "
                    f"already gave to {known!r}; the same label means the same provider, so use "
                    "another label for another callable"
                )

    async def resolve(self, provider: Provider, stack: AsyncExitStack | _SingletonScope) -> Any:
        """The value of `provider` for one handling; Factory teardowns go on `stack`."""
        identity = provider.identity
        if self.overrides:
            stacked = self.overrides.get(identity)
            if stacked:
                replacement = stacked[-1][1]
                if isinstance(replacement, Provider):
                    return await self.resolve(replacement, stack)
                return replacement
        if isinstance(provider, Singleton):
            value = self._instances.get(identity, _MISSING)
            if value is _MISSING:
                value = await self._create_singleton(provider, identity)
            return value
        return await self._create(provider, stack)

    async def resolve_all(
        self, values: Mapping[str, Any], stack: AsyncExitStack | _SingletonScope
    ) -> dict[str, Any]:
        """`values` with every provider replaced by its value, in order."""
        resolved = dict(values)
        for name, value in resolved.items():
            if isinstance(value, Provider):
                resolved[name] = await self.resolve(value, stack)
        return resolved

    async def _create_singleton(self, provider: Provider, identity: object) -> Any:
        self._check_open(provider)
        self._bind(f"make {provider!r}")
        lock = self._locks.get(identity)
        if lock is None:
            lock = self._locks[identity] = asyncio.Lock()
        async with lock:
            value = self._instances.get(identity, _MISSING)
            if value is _MISSING:
                # A failure propagates and caches nothing: the next handling tries again.
                value = await self._create(provider, self._scope)
                self._check_open(provider)  # torn down meanwhile: a generator's was undone by the scope
                self._instances[identity] = value
                self._refresh(identity)
            return value

    def _check_open(self, provider: Provider) -> None:
        if self.closed:
            raise DispatcherClosed(
                None,
                text=f"Cannot make {provider!r}: the dispatcher was stopped and its Singletons torn "
                "down; a handling still running after dp.stop() cannot make new ones",
            )

    async def _create(self, provider: Provider, stack: AsyncExitStack | _SingletonScope) -> Any:
        kwargs = await self.resolve_all(provider.kwargs, stack) if provider.kwargs else {}
        factory = provider.factory
        shape = provider.shape
        # A generator's failures before its yield get their note in __enter__/__aenter__.
        if shape == "async generator":
            return await stack.enter_async_context(_AsyncGeneratorProvider(provider, factory(**kwargs)))
        if shape == "generator":
            return stack.enter_context(_GeneratorProvider(provider, factory(**kwargs)))
        try:
            value = factory(**kwargs)
            if inspect.isawaitable(value):
                value = await value
            return value
        except Exception as exc:
            noted(exc, provider)
            raise

    def _refresh(self, identity: object) -> None:
        """Make `singletons[identity]` what a handling gets now (an override's value, or the instance)."""
        stacked = self.overrides.get(identity)
        if stacked:
            provider, replacement = stacked[-1]
            if isinstance(provider, Singleton) and not isinstance(replacement, Provider):
                self.singletons[identity] = replacement  # keeps the one-lookup path
                return
            self.singletons.pop(identity, None)  # resolved through the override's provider
            return
        value = self._instances.get(identity, _MISSING)
        if value is _MISSING:
            self.singletons.pop(identity, None)
        else:
            self.singletons[identity] = value

    @contextlib.contextmanager
    def override(self, provider: Provider, replacement: Any) -> Iterator[None]:
        """Resolve `provider` as `replacement` (a value or a provider) inside the block.

        Holds for the whole block, also when the Singleton was being made as it
        began (its instance is kept for after the block, made only once).
        """
        identity = provider.identity
        entry = (provider, replacement)
        stacked = self.overrides.setdefault(identity, [])
        stacked.append(entry)
        self._refresh(identity)
        try:
            yield
        finally:
            stacked = self.overrides[identity]
            del stacked[next(i for i, other in enumerate(stacked) if other is entry)]
            if not stacked:
                del self.overrides[identity]
            self._refresh(identity)

    async def aclose(self) -> None:
        """Tear down every Singleton, last created first, once; no Singleton is made afterwards.

        Each teardown runs on its own (one's failure is not thrown into the
        next); the failure, or an `ExceptionGroup` of several, is raised after.
        A Singleton whose making ends after this began is torn down at once.
        """
        if self.closed:
            return
        self.closed = True
        self._instances.clear()
        self._locks.clear()
        for identity in list(self.singletons):
            self._refresh(identity)
        await self._scope.aclose()


def noted(exc: Exception, provider: Provider) -> None:
    """Note on `exc`, raised while `provider` made its value, the provider's name
    (pybus's own errors name it already)."""
    if not isinstance(exc, ProviderError | DispatcherClosed):
        exc.add_note(f"raised by provider {provider!r} while making its value")


def enter_generator(provider: Provider, generator: Generator[Any, None, None]) -> Any:
    """Run a generator provider up to its yield; its value."""
    try:
        return next(generator)
    except StopIteration:
        raise ProviderError(repr(provider), "returned without yielding a value") from None
    except Exception as exc:
        noted(exc, provider)
        raise


def leave_generator(
    provider: Provider, generator: Generator[Any, None, None], exc: BaseException | None
) -> None:
    """Run a generator provider's teardown, after a handling that raised `exc` (None: that
    succeeded). Never hides `exc`: it propagates unless the teardown raises another error."""
    try:
        if exc is None:
            # A for loop ends a finished generator without raising StopIteration,
            # which costs more than the rest of a teardown.
            for _ in generator:
                break
            else:
                return
        else:
            generator.throw(exc)
    except StopIteration:
        return  # done; the handler's error, if any, propagates (never suppressed)
    except BaseException as raised:
        if raised is not exc:
            raised.add_note(f"raised by the teardown of provider {provider!r}")
        raise
    generator.close()
    raise ProviderError(repr(provider), "yielded a second time")


class _GeneratorProvider:
    """A generator provider as a context manager: yields once, never hides the handler's error."""

    __slots__ = ("generator", "provider")

    def __init__(self, provider: Provider, generator: Generator[Any, None, None]) -> None:
        self.provider = provider
        self.generator = generator

    def __enter__(self) -> Any:
        return enter_generator(self.provider, self.generator)

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> Literal[False]:
        leave_generator(self.provider, self.generator, exc)
        return False


class _AsyncGeneratorProvider:
    """An async generator provider as an async context manager (see `_GeneratorProvider`)."""

    __slots__ = ("generator", "provider")

    def __init__(self, provider: Provider, generator: AsyncGenerator[Any, None]) -> None:
        self.provider = provider
        self.generator = generator

    async def __aenter__(self) -> Any:
        try:
            return await anext(self.generator)
        except StopAsyncIteration:
            raise ProviderError(repr(self.provider), "returned without yielding a value") from None
        except Exception as exc:
            noted(exc, self.provider)
            raise

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> Literal[False]:
        try:
            if exc is None:
                async for _ in self.generator:  # as in _GeneratorProvider.__exit__
                    break
                else:
                    return False
            else:
                await self.generator.athrow(exc)
        except StopAsyncIteration:
            return False
        except BaseException as raised:
            if raised is not exc:
                raised.add_note(f"raised by the teardown of provider {self.provider!r}")
            raise
        await self.generator.aclose()
        raise ProviderError(repr(self.provider), "yielded a second time")


class _SingletonScope:
    """The teardowns of a dispatcher's Singletons, run independently at stop.

    Once closed, a Singleton entered late (its making ended after the teardown
    began) is torn down at once, and `DispatcherClosed` raised.
    """

    def __init__(self) -> None:
        self._entered: list[_GeneratorProvider | _AsyncGeneratorProvider] = []
        self.closed = False

    def enter_context(self, manager: _GeneratorProvider) -> Any:
        value = manager.__enter__()
        if self.closed:
            manager.__exit__(None, None, None)
            raise _late(manager.provider)
        self._entered.append(manager)
        return value

    async def enter_async_context(self, manager: _AsyncGeneratorProvider) -> Any:
        value = await manager.__aenter__()
        if self.closed:
            await manager.__aexit__(None, None, None)
            raise _late(manager.provider)
        self._entered.append(manager)
        return value

    async def aclose(self) -> None:
        self.closed = True
        failures: list[Exception] = []
        cancelled: asyncio.CancelledError | None = None
        while self._entered:
            manager = self._entered.pop()
            try:
                if isinstance(manager, _GeneratorProvider):
                    manager.__exit__(None, None, None)
                else:
                    await manager.__aexit__(None, None, None)
            except Exception as exc:
                failures.append(exc)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    cancelled = exc  # the loop is ending: still tear the others down, then end
                else:  # raised by the teardown itself: a failure, not a cancellation of the stop
                    failures.append(_cancelled_itself(manager.provider, exc))
        if cancelled is not None and not failures:
            raise cancelled
        # A failure outweighs the cancellation (the loop ending): it has somewhere to go,
        # the shutdown that called this raises it or hands it to the error hook.
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise ExceptionGroup(f"{len(failures)} Singleton teardowns failed", failures)


def _cancelled_itself(provider: Provider, cancelled: asyncio.CancelledError) -> Exception:
    """A teardown that raised `CancelledError` while nothing cancelled it, as an exception
    that `stop()` can raise without telling its caller it was cancelled."""
    error = RuntimeError(
        f"The teardown of {provider!r} raised CancelledError though nothing cancelled the shutdown "
        "(it awaited something that was cancelled); catch it in the teardown, or finish that work first"
    )
    error.__cause__ = cancelled
    return error


def _late(provider: Provider) -> DispatcherClosed:
    return DispatcherClosed(
        None,
        text=f"Cannot make {provider!r}: the dispatcher was stopped and its Singletons torn down while "
        "it was being made (it was torn down at once); a handling still running after dp.stop() "
        "cannot make new ones",
    )
