"""Profiles: a job names its de-identification profile; a crosswalk row its pseudonym scope.

Revision ID: 0005_profiles
Revises: 0002_lane_leases (re-chained after merging main; was 0001)
Create Date: 2026-12-01

Existing rows are the v1 ones: profile "" (the [deid] table) and scope "default".
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_profiles"
down_revision: str | None = "0002_lane_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("profile", sa.String(64), nullable=False, server_default=""))
    with op.batch_alter_table("crosswalk") as batch:
        batch.add_column(sa.Column("scope", sa.String(64), nullable=False, server_default="default"))


def downgrade() -> None:
    with op.batch_alter_table("crosswalk") as batch:
        batch.drop_column("scope")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("profile")
