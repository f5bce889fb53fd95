"""Every example runs, as a user would run it, and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout


def test_quickstart_shows_command_follow_up_and_query() -> None:
    assert run_example("quickstart.py").splitlines() == [
        "[command] RegisterUser('Ada') -> stored as user 1",
        "[event]   UserRegistered -> welcome mail to ada@example.com",
        "[event]   UserRegistered -> signups metric +1 (user 1)",
        "[result]  execute returned user id 1",
        "[query]   GetUserName(1) -> 'Ada'",
    ]


def test_readme_example_runs() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.splitlines() == ["welcome, user 1", "UserRegistered(user_id=1)"]


def test_di_container_example_builds_handlers_from_dishka() -> None:
    assert run_example("di_container.py").splitlines() == [
        "[container] mailer connected",
        "[result] mail #1 to ada@example.com: please pay 120 EUR",
        "[result] mail #2 to bob@example.com: please pay 80 EUR",
        "[container] mailer disconnected",
    ]


async def test_di_container_gives_a_new_handler_per_message_and_one_mailer() -> None:
    from dishka import make_async_container

    from examples import di_container

    built: list[object] = []
    container = make_async_container(di_container.AppProvider())

    async def tracking(cls: type) -> object:
        handler: object = await container.get(cls)
        built.append(handler)
        return handler

    dp = di_container.build(container)
    dp.handler_factory = tracking  # before start, as a user would configure it
    async with dp:
        await dp.execute(di_container.SendInvoice("a", 1))
        await dp.execute(di_container.SendInvoice("b", 2))
    await container.close()
    first, second = built
    assert first is not second
    assert first.mailer is second.mailer  # type: ignore[attr-defined]


def test_orders_example_runs() -> None:
    assert run_example("orders.py").splitlines() == [
        "placed order 1; the stock is reserved in the background",
        "mails sent: ['order 1 confirmed']",
    ]


BOOK = "Book(title=\"Philosopher's Stone\", author='J. K. Rowling', year=1997)"
BOOKS_OUTPUT = [
    "application started",
    "got command CreateBook(title=\"Philosopher's Stone\", author='J. K. Rowling', year=1997)",
    f"got event BookCreated(book={BOOK})",
    'got query BookQuery(title="Philosopher\'s Stone"), found 1 books',
    f"query result: BookQueryResult(books=[{BOOK}])",
]


def run_module(name: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=EXAMPLES.parent,
    )
    return result.stdout


def test_books_example_decorator_style() -> None:
    assert run_module("examples.books.decorators").splitlines() == BOOKS_OUTPUT


def test_books_example_bind_style() -> None:
    assert run_module("examples.books.bindings").splitlines() == [*BOOKS_OUTPUT, "query returned 1 book(s)"]


def test_the_docs_include_the_quickstart_file() -> None:
    index = (EXAMPLES.parent / "docs" / "index.md").read_text()
    assert '--8<-- "examples/quickstart.py"' in index


def test_middleware_example_times_caches_replaces_and_translates() -> None:
    lines = [re.sub(r"took \d+ ms", "took N ms", line) for line in run_example("middleware.py").splitlines()]
    assert lines == [
        "[timed]  query get_price took N ms",
        "[result] 12.5",
        "[cache]  GetPrice(sku='book-1') answered from the cache",
        "[timed]  query get_price took N ms",
        "[result] 12.5",
        "[timed]  command add_to_cart took N ms",
        "[result] 2 x BOOK-1 in the cart",
        "[timed]  command add_to_cart took N ms",
        "[error]  cannot add book-1: 1 left",
    ]


def test_background_example_sends_orders_by_key_reports_errors_and_refuses_when_full() -> None:
    assert run_example("background.py").splitlines() == [
        "[on_error] ChargeCard(amount=-5) failed: a charge is positive",
        "[command] reindexed user 7",
        "[query]   pages seen: {7: ['home', 'a-long-article', 'cart', 'checkout']}",
        "[stats]   EngineStatistics(queued=0, in_flight=0, handled=1, failed=1, active_keys=0, unhandled=0)",
        "[full]    The command queue is full (it holds 1 message at most); await dp.commands.send() "
        "to wait for room, or raise Dispatcher(queue_size=...)",
    ]


def test_injection_example_commits_rolls_back_overrides_and_disposes() -> None:
    assert run_example("injection.py").splitlines() == [
        "[engine]  connected",
        "[session] committed {1: 'ada'}",
        "[result]  user 1 is 'ada'",
        "[session] rolled back: a user needs a name",
        "[override] 'a fake ada'",
        "[after]   'ada'",
        "[engine]  disposed",
    ]


def test_follow_up_example_publishes_collected_then_returned_events_breadth_first() -> None:
    assert run_example("follow_up.py").splitlines() == [
        "[event]  StockReserved(7)",
        "[event]  OrderPlaced(7) -> returns InvoiceSent",
        "[event]  InvoiceSent(7)",
        "[result] execute returned OrderPlaced(order_id=7) after every follow-up ran",
    ]


def test_in_memory_transport_example_delivers_to_each_service() -> None:
    assert run_example("transport_in_memory.py").splitlines() == [
        "[billing]   invoice for order 1: 25.0 (delivery 1)",
        "[warehouse] picking order 1",
        "[warehouse] shipped order 1",
    ]


async def test_user_signup_example_publishes_to_three_domains_only_after_the_commit(tmp_path: Path) -> None:
    from examples.user_signup import main

    assert await main(tmp_path / "users.db") == [
        "mail: welcome, ada",
        "stats: 1 user(s)",  # the row is committed before any domain hears of it
        "audit: user 1 created",
        "accounts: 'ada' is taken; nothing was published",
    ]
