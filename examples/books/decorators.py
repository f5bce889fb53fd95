"""The books example, decorator style: handlers registered where they are defined.

iambus sent the messages to its queues and slept 0.1 s "to give the app some
time"; pybus sends them to the background workers and `join()`s instead.
"""

from __future__ import annotations

import asyncio
import dataclasses

from examples.books.messages import BookCreated, BookQuery, BookQueryResult, CreateBook
from examples.books.models import Book
from pybus import Dispatcher, Singleton

dp = Dispatcher()


async def get_storage() -> dict[str, Book]:
    """The storage, made once per dispatcher on first use."""
    return {}


@dp.commands.register(CreateBook, storage=Singleton["storage":get_storage])
async def create_book_handler(command: CreateBook, storage: dict[str, Book]) -> BookCreated:
    print(f"got command {command}")
    book = Book(**dataclasses.asdict(command))
    storage[book.title] = book
    return BookCreated(book=book)  # the result, and an event the dispatcher publishes


@dp.events.register(BookCreated)
async def book_created_handler(event: BookCreated) -> None:
    print(f"got event {event}")


@dp.queries.register(BookQuery, storage=Singleton["storage":get_storage])  # the same label: the same storage
async def book_query_handler(query: BookQuery, storage: dict[str, Book]) -> BookQueryResult:
    books = [book for title, book in storage.items() if title == query.title]
    print(f"got query {query}, found {len(books)} books")
    return BookQueryResult(books=books)


@dp.events.register(BookQueryResult)
async def listen_query(event: BookQueryResult) -> None:
    print(f"query result: {event}")


@dp.events.register("on startup")
async def on_start() -> None:
    print("application started")


async def main() -> None:
    async with dp:
        await dp.events.send("on startup")
        await dp.join()
        await dp.commands.send(CreateBook(title="Philosopher's Stone", author="J. K. Rowling", year=1997))
        await dp.join()
        await dp.queries.send(BookQuery(title="Philosopher's Stone"))


if __name__ == "__main__":
    asyncio.run(main())
