"""Regenerate the initial Alembic revision from the models (pre-release only: until a
database exists that was migrated with 0001, the schema is one revision)."""

import os
import tempfile
from pathlib import Path

from alembic import command

from coordinator.migrate import MIGRATIONS, alembic_config

target = MIGRATIONS / "versions" / "0001_initial_schema.py"
target.unlink(missing_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    command.revision(alembic_config(f"sqlite:///{Path(tmp) / 'm.db'}"), message="initial schema",
                     autogenerate=True, rev_id="0001")
print(f"wrote {target.relative_to(Path.cwd()) if target.is_relative_to(Path.cwd()) else target}")
_ = os
