"""Lane leases: at most max_associations associations per destination, cluster-wide.

Revision ID: 0002_lane_leases
Revises: 0003_users
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_lane_leases"
down_revision: str | None = "0004_secret_fingerprint"  # one linear chain: 0001, 0003, 0004, 0002
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "lane_leases",
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("lane", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("wanted_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("destination", "lane", name="pk_lane_leases"),
    )


def downgrade() -> None:
    op.drop_table("lane_leases")
