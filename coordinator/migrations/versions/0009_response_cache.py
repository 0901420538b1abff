"""response cache: an account's opt-in flag, and the cached flag of requests served from it

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 13:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('accounts') as batch:
        batch.add_column(sa.Column('response_cache', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('inference_requests') as batch:
        batch.add_column(sa.Column('cached', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('inference_requests') as batch:
        batch.drop_column('cached')
    with op.batch_alter_table('accounts') as batch:
        batch.drop_column('response_cache')
