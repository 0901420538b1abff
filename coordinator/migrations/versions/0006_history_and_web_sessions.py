"""dashboards: per-minute market and node history, dashboard sign-ins (sessions and
single-use links), and an index on when requests ended (the history reads by it)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 10:30:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'market_minutes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('minute', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('nodes_live', sa.Integer(), nullable=False),
        sa.Column('capacity', sa.Integer(), nullable=False),
        sa.Column('active', sa.Integer(), nullable=False),
        sa.Column('ask_out_p10', sa.Integer(), nullable=True),
        sa.Column('ask_out_p50', sa.Integer(), nullable=True),
        sa.Column('ask_out_p90', sa.Integer(), nullable=True),
        sa.Column('ask_in_p50', sa.Integer(), nullable=True),
        sa.Column('tok_s_p50', sa.Float(), nullable=True),
        sa.Column('tok_s_p90', sa.Float(), nullable=True),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('rejected', sa.Integer(), nullable=False),
        sa.Column('cancelled', sa.Integer(), nullable=False),
        sa.Column('failed_over', sa.Integer(), nullable=False),
        sa.Column('buyer_gone', sa.Integer(), nullable=False),
        sa.Column('market_fault', sa.Integer(), nullable=False),
        sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
        sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
        sa.Column('volume', sa.BigInteger(), nullable=False),
        sa.Column('fees', sa.BigInteger(), nullable=False),
        sa.Column('ttft_p50_ms', sa.Float(), nullable=True),
        sa.Column('ttft_p90_ms', sa.Float(), nullable=True),
        sa.Column('ttft_p99_ms', sa.Float(), nullable=True),
        sa.Column('itl_p50_ms', sa.Float(), nullable=True),
        sa.Column('itl_p99_ms', sa.Float(), nullable=True),
        sa.Column('audits_passed', sa.Integer(), nullable=False),
        sa.Column('audits_failed', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('minute', 'model', name='uq_market_minute'),
    )
    op.create_index('ix_market_minutes_minute', 'market_minutes', ['minute'])
    op.create_table(
        'node_minutes',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('minute', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('node_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('online', sa.Boolean(), nullable=False),
        sa.Column('routable', sa.Boolean(), nullable=False),
        sa.Column('price_in', sa.Integer(), nullable=False),
        sa.Column('price_out', sa.Integer(), nullable=False),
        sa.Column('tok_s', sa.Float(), nullable=True),
        sa.Column('ttft_ms', sa.Float(), nullable=True),
        sa.Column('active', sa.Integer(), nullable=False),
        sa.Column('max_concurrency', sa.Integer(), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
        sa.Column('revenue', sa.BigInteger(), nullable=False),
        sa.Column('audits_passed', sa.Integer(), nullable=False),
        sa.Column('audits_failed', sa.Integer(), nullable=False),
        sa.Column('reputation', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('minute', 'node_id', 'model', name='uq_node_minute'),
    )
    op.create_index('ix_node_minutes_minute', 'node_minutes', ['minute'])
    op.create_index('ix_node_minutes_node_id', 'node_minutes', ['node_id'])
    op.create_table(
        'web_sessions',
        sa.Column('token_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('used_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint('token_hash'),
    )
    op.create_index('ix_web_sessions_expires_at', 'web_sessions', ['expires_at'])
    with op.batch_alter_table('inference_requests', schema=None) as batch_op:
        batch_op.create_index('ix_inference_requests_finished_at', ['finished_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('inference_requests', schema=None) as batch_op:
        batch_op.drop_index('ix_inference_requests_finished_at')
    op.drop_index('ix_web_sessions_expires_at', table_name='web_sessions')
    op.drop_table('web_sessions')
    op.drop_index('ix_node_minutes_node_id', table_name='node_minutes')
    op.drop_index('ix_node_minutes_minute', table_name='node_minutes')
    op.drop_table('node_minutes')
    op.drop_index('ix_market_minutes_minute', table_name='market_minutes')
    op.drop_table('market_minutes')
