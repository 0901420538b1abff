"""delivery acknowledgement: settlement charges the buyer what its handler wrote

Requests already SETTLING when this runs were relayed under the old rule (the buyer
charged for every relayed token): they are marked delivered in full, so they settle as
before instead of waiting for an acknowledgement that will never come.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 19:04:14.059975
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inference_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('delivered_tokens', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('delivery', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
    op.execute("UPDATE inference_requests SET delivery = 'complete', delivered_tokens = "
               "(SELECT completion_tokens FROM receipts WHERE receipts.request_id = inference_requests.id) "
               "WHERE status = 'SETTLING'")


def downgrade() -> None:
    with op.batch_alter_table('inference_requests', schema=None) as batch_op:
        batch_op.drop_column('delivery')
        batch_op.drop_column('delivered_tokens')

