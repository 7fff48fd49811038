"""Alembic migrations of the queue schema, shipped inside the package so ``serve`` can migrate."""
