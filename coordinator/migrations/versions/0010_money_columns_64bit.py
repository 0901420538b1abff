"""money columns 64-bit: prices (nano-USD per million tokens), holds and costs

A 32-bit price column ends at 2,147,483,647 nano-USD, $2.147 per million tokens: on
PostgreSQL a seller asking more (the operator's default ceiling is $100) got a 500 at
registration. SQLite's INTEGER holds 64 bits already; its tables are rebuilt (batch mode)
only so that the declared types match the models.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 21:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

COLUMNS = {
    'node_offers': ('price_in', 'price_out'),
    'inference_requests': ('hold_amount', 'price_in', 'price_out', 'cost'),
    'market_minutes': ('ask_out_p10', 'ask_out_p50', 'ask_out_p90', 'ask_in_p50'),
    'node_minutes': ('price_in', 'price_out'),
}


def _alter(to, frm) -> None:
    for table, cols in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for col in cols:
                batch.alter_column(col, type_=to, existing_type=frm)


def upgrade() -> None:
    _alter(sa.BigInteger(), sa.Integer())


def downgrade() -> None:
    _alter(sa.Integer(), sa.BigInteger())
