"""Durable queue: SQLAlchemy models, engine/migrations and the job repository (the only SQL)."""
