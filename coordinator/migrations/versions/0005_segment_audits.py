"""segment audits: after a failover each node's part of the stream is audited on its own, so
a request may have one audit per segment (unique on request and segment, not on request)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 23:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audits', schema=None) as batch_op:
        batch_op.add_column(sa.Column('segment', sa.Integer(), nullable=False, server_default='0'))
        batch_op.drop_index(batch_op.f('ix_audits_request_id'))
        batch_op.create_index(batch_op.f('ix_audits_request_id'), ['request_id'], unique=False)
        batch_op.create_unique_constraint('uq_audits_request_segment', ['request_id', 'segment'])


def downgrade() -> None:
    with op.batch_alter_table('audits', schema=None) as batch_op:
        batch_op.drop_constraint('uq_audits_request_segment', type_='unique')
        batch_op.drop_index(batch_op.f('ix_audits_request_id'))
        batch_op.create_index(batch_op.f('ix_audits_request_id'), ['request_id'], unique=True)
        batch_op.drop_column('segment')
