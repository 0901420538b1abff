"""OpenAI Batch API: uploaded files, batches and their lines

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 14:00:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'batch_files',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('account_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column('bytes', sa.Integer(), nullable=False),
        sa.Column('lines', sa.Integer(), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_batch_files_account_id', 'batch_files', ['account_id'], unique=False)
    op.create_table(
        'batches',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('account_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('endpoint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('model', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('input_file_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('completion_window', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('output_file_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column('error_file_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('meta', sa.JSON(), nullable=True),
        sa.Column('errors', sa.JSON(), nullable=True),
        sa.Column('lease_owner', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column('lease_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('in_progress_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('finalizing_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('completed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('failed_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('expired_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('cancelling_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column('cancelled_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_batches_account_id', 'batches', ['account_id'], unique=False)
    op.create_index('ix_batches_created_at', 'batches', ['created_at'], unique=False)
    op.create_index('ix_batches_status', 'batches', ['status'], unique=False)
    op.create_table(
        'batch_lines',
        sa.Column('batch_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('idx', sa.Integer(), nullable=False),
        sa.Column('custom_id', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('request_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('result', sa.JSON(), nullable=True),
        sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ),
        sa.PrimaryKeyConstraint('batch_id', 'idx'),
    )


def downgrade() -> None:
    op.drop_table('batch_lines')
    op.drop_index('ix_batches_status', table_name='batches')
    op.drop_index('ix_batches_created_at', table_name='batches')
    op.drop_index('ix_batches_account_id', table_name='batches')
    op.drop_table('batches')
    op.drop_index('ix_batch_files_account_id', table_name='batch_files')
    op.drop_table('batch_files')
