"""The books example, bind style: plain functions, registered in one place with their storage."""

from __future__ import annotations

import asyncio
import dataclasses

from examples.books.messages import BookCreated, BookQuery, BookQueryResult, CreateBook
from examples.books.models import Book
from pybus import Dispatcher


async def create_book_handler(command: CreateBook, storage: dict[str, Book]) -> BookCreated:
    print(f"got command {command}")
    book = Book(**dataclasses.asdict(command))
    storage[book.title] = book
    return BookCreated(book=book)


async def book_created_handler(event: BookCreated) -> None:
    print(f"got event {event}")


async def book_query_handler(query: BookQuery, storage: dict[str, Book]) -> BookQueryResult:
    books = [book for title, book in storage.items() if title == query.title]
    print(f"got query {query}, found {len(books)} books")
    return BookQueryResult(books=books)


async def listen_query(event: BookQueryResult) -> None:
    print(f"query result: {event}")


async def on_start() -> None:
    print("application started")


def build() -> Dispatcher:
    dp = Dispatcher()
    storage: dict[str, Book] = {}  # a plain value bound to both handlers
    dp.commands.bind(CreateBook, handler=create_book_handler, storage=storage)
    dp.events.bind(BookCreated, handler=book_created_handler)
    dp.queries.bind(BookQuery, handler=book_query_handler, storage=storage)
    dp.events.bind(BookQueryResult, handler=listen_query)
    dp.events.bind("on startup", handler=on_start)
    return dp


async def main() -> None:
    async with build() as dp:
        await dp.publish("on startup")
        await dp.execute(CreateBook(title="Philosopher's Stone", author="J. K. Rowling", year=1997))
        result = await dp.query(BookQuery(title="Philosopher's Stone"))
        print(f"query returned {len(result.books)} book(s)")


if __name__ == "__main__":
    asyncio.run(main())
