"""iambus's books example, ported to pybus in both of its styles.

Run `uv run python -m examples.books.decorators` or `uv run python -m examples.books.bindings`
from the repository root.
"""
