"""api replicas: each API process says it is alive, and each request names the one serving
its buyer, so the requests of a replica that died are ended at once (coordinator/replicas.py);
and each node's evidence across audits of int8 served as bf16 (scheduler/evidence.py)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 20:22:33.631974
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_replicas',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('host', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('last_seen', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('api_replicas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_replicas_last_seen'), ['last_seen'], unique=False)

    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('precision_cusum', sa.Float(), nullable=False, server_default='0'))

    with op.batch_alter_table('inference_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replica_id', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_inference_requests_replica_id'), ['replica_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('precision_cusum')
    with op.batch_alter_table('inference_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inference_requests_replica_id'))
        batch_op.drop_column('replica_id')

    with op.batch_alter_table('api_replicas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_replicas_last_seen'))

    op.drop_table('api_replicas')
