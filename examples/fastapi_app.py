"""A FastAPI service that registers and reads users through the dispatcher.

Run: `uv run uvicorn examples.fastapi_app:app` (fastapi and uvicorn are dev
dependencies of this repository, not dependencies of pybus).

- POST /users {"name", "email"}  -> 201 {"id"}; 409 if the email is taken;
  400 if the email is not an email or the body does not fit
- GET /users/{id}                -> 200 the user; 404 if there is none
- GET /users/{id}/mails          -> the welcome mail, sent by a follow-up event handler

The dispatcher is started and stopped by the app's lifespan; domain errors
raised by handlers reach the endpoint unchanged (pybus never wraps a handler's
exception) and are mapped to status codes in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from pybus import Command, Dispatcher, DispatcherClosed, Event, HandlerNotFound, Query, Singleton

# -- domain ---------------------------------------------------------------------------


class UserNotFound(LookupError):
    pass


class EmailTaken(Exception):
    pass


class InvalidUser(ValueError):
    pass


@dataclass(frozen=True)
class User:
    id: int
    name: str
    email: str


class Users:
    """A stand-in for a real repository."""

    def __init__(self) -> None:
        self.by_id: dict[int, User] = {}
        self.mails: dict[int, list[str]] = {}

    def add(self, name: str, email: str) -> User:
        if any(user.email == email for user in self.by_id.values()):
            raise EmailTaken(f"{email} is already registered")
        user = User(len(self.by_id) + 1, name, email)
        self.by_id[user.id] = user
        return user


# -- messages and handlers -----------------------------------------------------------------


@dataclass(frozen=True)
class UserRegistered(Event):
    user: User


@dataclass(frozen=True)
class RegisterUser(Command[UserRegistered]):
    name: str
    email: str


@dataclass(frozen=True)
class GetUser(Query[User]):
    user_id: int


def create_dispatcher() -> Dispatcher:
    dp = Dispatcher()
    users = Singleton(Users)

    @dp.commands.register(RegisterUser, users=users)
    async def register_user(cmd: RegisterUser, users: Users) -> UserRegistered:
        if "@" not in cmd.email:
            raise InvalidUser(f"{cmd.email!r} is not an email address")
        return UserRegistered(users.add(cmd.name, cmd.email))

    @dp.queries.register(GetUser, users=users)
    async def get_user(query: GetUser, users: Users) -> User:
        try:
            return users.by_id[query.user_id]
        except KeyError:
            raise UserNotFound(f"no user {query.user_id}") from None

    @dp.events.register(UserRegistered, users=users)
    async def send_welcome(event: UserRegistered, users: Users) -> None:
        users.mails.setdefault(event.user.id, []).append(f"Welcome, {event.user.name}!")

    @dp.queries.register("mails", users=users, argname="query")
    async def mails(query: str, users: Users) -> dict[int, list[str]]:
        return users.mails

    return dp


# -- the web app -----------------------------------------------------------------------

dispatcher = create_dispatcher()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with dispatcher:  # start; on shutdown drain the background queues and stop
        yield


app = FastAPI(title="users", lifespan=lifespan)

STATUS = {
    UserNotFound: 404,
    EmailTaken: 409,
    InvalidUser: 400,
    HandlerNotFound: 501,
    DispatcherClosed: 503,
}


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=STATUS[type(exc)])


for error in STATUS:
    app.add_exception_handler(error, error_response)


@app.exception_handler(RequestValidationError)
async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": "the request does not fit: " + str(exc.errors())}, status_code=400)


class NewUser(BaseModel):
    name: str
    email: str


@app.post("/users", status_code=201)
async def register(body: NewUser) -> dict[str, int]:
    registered = await dispatcher.execute(RegisterUser(body.name, body.email))
    return {"id": registered.user.id}


@app.get("/users/{user_id}")
async def read(user_id: int) -> dict[str, object]:
    user = await dispatcher.query(GetUser(user_id))
    return {"id": user.id, "name": user.name, "email": user.email}


@app.get("/users/{user_id}/mails")
async def read_mails(user_id: int) -> list[str]:
    await dispatcher.query(GetUser(user_id))  # 404 for an unknown user
    everything: dict[int, list[str]] = await dispatcher.query("mails")
    return everything.get(user_id, [])
