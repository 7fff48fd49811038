"""Alembic migrations of the queue schema.

They live at the top of the repository and are installed as the package
``deid_router.migrations`` (pyproject.toml ``package-dir``), so ``serve`` migrates itself from a
wheel; ``deid_router.db.engine.migrations_dir`` finds them through the import system.
"""
