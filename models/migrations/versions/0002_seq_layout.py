"""Replace streams.chunk_ends by seq_layout (chunks and markers); index finished_at.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every chunk_ends item (a chunk's end offset) is a valid seq_layout item as it is.
    with op.batch_alter_table("streams", schema=None) as batch_op:
        batch_op.alter_column("chunk_ends", new_column_name="seq_layout",
                              existing_type=sa.Text(), existing_nullable=False)
        batch_op.create_index(batch_op.f("ix_streams_finished_at"), ["finished_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("streams", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_streams_finished_at"))
        batch_op.alter_column("seq_layout", new_column_name="chunk_ends",
                              existing_type=sa.Text(), existing_nullable=False)
