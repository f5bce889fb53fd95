"""The messages of the books example: pybus's typed bases replace iambus's Message classes."""

from __future__ import annotations

from dataclasses import dataclass

from examples.books.models import Book
from pybus import Command, Event, Query


@dataclass(frozen=True, slots=True)
class BookCreated(Event):
    book: Book


@dataclass(frozen=True, slots=True)
class CreateBook(Command[BookCreated]):
    title: str
    author: str
    year: int


@dataclass(frozen=True, slots=True)
class BookQueryResult(Event):
    """A query's result is also published as an event, as in iambus: `listen_query` hears it."""

    books: list[Book]


@dataclass(frozen=True, slots=True)
class BookQuery(Query[BookQueryResult]):
    title: str
