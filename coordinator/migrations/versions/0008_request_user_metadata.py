"""request user and metadata: the buyer's own labels kept on the request record

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 13:20:00
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inference_requests') as batch:
        batch.add_column(sa.Column('buyer_user', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True))
        batch.add_column(sa.Column('buyer_metadata', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('inference_requests') as batch:
        batch.drop_column('buyer_metadata')
        batch.drop_column('buyer_user')
