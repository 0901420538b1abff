"""engine capabilities and node health

What each offer's engine can do (token ids, log-probs, verifying; its quantisation),
operator-run verifiers, the live work channel per node, the node's recent error rate, and
audits that expire when no capable verifier answers, the operator's trusted verifiers, jobs
since the last (re)connect, and overturned verdicts.
Existing rows get the old behaviour (built-in engine: all capabilities).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 19:33:13.667679
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":  # a native enum type there; SQLite keeps a string
        op.execute("ALTER TYPE auditstatus ADD VALUE IF NOT EXISTS 'EXPIRED'")
    with op.batch_alter_table('node_offers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('quantization', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
        batch_op.add_column(sa.Column('token_ids', sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column('logprobs', sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column('can_verify', sa.Boolean(), nullable=False, server_default=sa.true()))

    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('verify_only', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('channel_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch_op.add_column(sa.Column('error_rate', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('excluded_reason', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True))
        batch_op.add_column(sa.Column('trusted', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('session_jobs', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('verdicts_overturned', sa.Integer(), nullable=False, server_default='0'))



def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('verdicts_overturned')
        batch_op.drop_column('session_jobs')
        batch_op.drop_column('trusted')
        batch_op.drop_column('excluded_reason')
        batch_op.drop_column('error_rate')
        batch_op.drop_column('channel_id')
        batch_op.drop_column('verify_only')

    with op.batch_alter_table('node_offers', schema=None) as batch_op:
        batch_op.drop_column('can_verify')
        batch_op.drop_column('logprobs')
        batch_op.drop_column('token_ids')
        batch_op.drop_column('quantization')

