"""The `agora` command. Sub-commands are imported lazily so that a seller who installed
only `agora[node]` never imports the coordinator's server code."""

from __future__ import annotations

import os
import sys

USAGE = """usage: agora <command> [options]

  up                 the embedded market in one process: coordinator, in-process scheduler,
                     SQLite, and local node agents (--port, --nodes)
  node               run a node agent that sells inference (see `agora node -h`)
  verifier           run an operator's verifier: a node agent that only rescores audited
                     jobs and is never sold work (see `agora verifier -h`)
  serve              run the coordinator API (production: PostgreSQL, Redis, separate workers)
  worker             run a Celery scheduler worker (add --beat for the periodic sweep)
  migrate            apply database migrations
  account            create accounts, deposit, show balances
  dashboard-link     print a single-use link that signs the operator in to the dashboards
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "node":
        from node_agent.cli import main as node_main

        return node_main(rest)
    if cmd == "verifier":  # a node agent too: no coordinator code imported
        from node_agent.cli import verifier_main

        return verifier_main(rest)
    # The router's numpy work is many small matrix ops: one BLAS thread is faster and
    # steadier than a pool fighting the API and Celery threads (set before numpy loads).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from coordinator.cli import COMMANDS

    if cmd not in COMMANDS:
        print(f"agora: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](rest) or 0


if __name__ == "__main__":
    sys.exit(main())
