"""The domain model of the books example."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Book:
    title: str
    author: str
    year: int
