"""Coordinator-side commands of `agora`: up, serve, worker, migrate, account, dashboard-link."""

from __future__ import annotations

import argparse
import json
import sys

from coordinator.settings import CoordinatorSettings


def _settings(args: argparse.Namespace) -> CoordinatorSettings:
    overrides = {}
    if getattr(args, "home", None):
        overrides["home"] = args.home
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    return CoordinatorSettings(**overrides)


def cmd_up(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agora up", description="The whole market on this machine.")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--model", default="tiny")
    p.add_argument("--home", help="state folder (default ~/.agora)")
    p.add_argument("--credit", type=float, default=10.0, help="demo account credit in USD")
    p.add_argument("--no-verifier", dest="verifier", action="store_false",
                   help="no operator verifier (audits then wait for nodes that have earned the right to verify)")
    args = p.parse_args(argv)
    from coordinator.embedded import run_embedded

    return run_embedded(_settings(args), host=args.host, port=args.port, nodes=args.nodes,
                        model=args.model, credit_usd=args.credit, verifier=args.verifier)


def cmd_serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agora serve", description="Run the coordinator API.")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--no-migrate", action="store_true", help="do not apply migrations at start")
    args = p.parse_args(argv)
    import uvicorn

    from coordinator.app import create_app, tune_gc
    from coordinator.migrate import upgrade

    settings = CoordinatorSettings()
    if not args.no_migrate:
        upgrade(settings.effective_database_url)
    app = create_app(settings)
    tune_gc()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                ws_per_message_deflate=settings.ws_deflate)
    return 0


def cmd_worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agora worker", description="Run a Celery scheduler worker.")
    p.add_argument("--beat", action="store_true", help="also run the periodic sweep (one per deployment)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--loglevel", default="WARNING")
    p.add_argument("--no-supervise", action="store_true",
                   help="run the Celery worker in this process; by default it runs as a child process that "
                        "is restarted (with backoff) whenever it exits on its own")
    args = p.parse_args(argv)
    if not args.no_supervise:
        import sys

        from coordinator.supervise import supervise

        return supervise([sys.executable, "-m", "agora", "worker", "--no-supervise", *argv])
    from coordinator.worker import app, runtime

    cli = ["worker", "--pool=threads", f"--concurrency={args.concurrency}", f"--loglevel={args.loglevel}",
           "--without-gossip", "--without-mingle", "-Q", runtime.settings.celery_queue]
    if args.beat:
        runtime.settings.home.mkdir(parents=True, exist_ok=True)
        cli += ["--beat", f"--schedule={runtime.settings.home / 'celerybeat-schedule'}"]
    app.worker_main(cli)
    return 0


def cmd_migrate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agora migrate", description="Apply database migrations.")
    p.add_argument("--database-url")
    args = p.parse_args(argv)
    from coordinator.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.effective_database_url)
    print(f"migrated {settings.effective_database_url.split('@')[-1]}")
    return 0


def cmd_account(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agora account", description="Buyer accounts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    create = sub.add_parser("create", help="create an account; prints its API key on stdout")
    create.add_argument("--name", default="buyer")
    create.add_argument("--credit", type=int, default=0, help="initial credit in nano-USD")
    bal = sub.add_parser("balance", help="show an account's balance")
    bal.add_argument("account_id")
    dep = sub.add_parser("deposit", help="credit an account (operator)")
    dep.add_argument("account_id")
    dep.add_argument("amount", type=int, help="nano-USD")
    dep.add_argument("--idempotency-key", required=True)
    stm = sub.add_parser("statement", help="an account's transfers, newest first")
    stm.add_argument("account_id")
    stm.add_argument("--limit", type=int, default=20)
    stm.add_argument("--before", type=int, help="cursor from the previous page")
    cache = sub.add_parser("cache", help="turn the response cache on or off as the account's default "
                           "(a request's X-Agora-Cache header overrides it)")
    cache.add_argument("account_id")
    cache.add_argument("state", choices=["on", "off"])
    for q in (create, bal, dep, stm, cache):
        q.add_argument("--database-url")
        q.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if getattr(args, "credit", 0) < 0 or getattr(args, "amount", 0) < 0:
        p.error("amounts must be >= 0")
    from coordinator.account_service import create_account
    from coordinator.db import make_engine, session_scope
    from coordinator.migrate import upgrade
    from coordinator.models import Account
    from pricing.ledger import Ledger

    settings = _settings(args)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    with session_scope(engine) as s:
        if args.cmd == "create":
            account, key = create_account(s, args.name, args.credit)
            out = {"account_id": account.id, "api_key": key, "balance_nano_usd": args.credit}
            print(json.dumps(out) if args.json else key)
            if not args.json:
                print(f"account {account.id} created with {args.credit} nano-USD", file=sys.stderr)
            return 0
        account = s.get(Account, args.account_id)
        if account is None:
            print(f"no account {args.account_id}", file=sys.stderr)
            return 1
        ledger = Ledger(s)
        if args.cmd == "cache":
            account.response_cache = args.state == "on"
            s.add(account)
            print(json.dumps({"account_id": account.id, "response_cache": account.response_cache}) if args.json
                  else f"response cache {args.state} for {account.id}")
            return 0
        if args.cmd == "statement":
            from dataclasses import asdict

            from pricing.statement import statement

            page = statement(s, account.ledger_account_id, limit=args.limit, before=args.before)
            if args.json:
                print(json.dumps({"balance_nano_usd": page.balance, "next_cursor": page.next_cursor,
                                  "entries": [asdict(e) for e in page.entries]}, default=str))
            else:
                print(f"balance {page.balance} nano-USD")
                for e in page.entries:
                    print(f"{e.created_at:%Y-%m-%d %H:%M:%S}  {e.kind:<8} {e.amount:>+16}  {e.request_ref or ''}")
                if page.next_cursor:
                    print(f"(more: --before {page.next_cursor})")
            return 0
        if args.cmd == "deposit":
            from pricing.errors import LedgerError

            try:
                ledger.deposit(account.ledger_account_id, args.amount, idempotency_key=args.idempotency_key)
            except LedgerError as exc:  # e.g. the key was used for another amount: nothing moved
                print(f"agora account deposit: {exc}", file=sys.stderr)
                return 1
        balance = ledger.balance(account.ledger_account_id)
        print(json.dumps({"account_id": account.id, "balance_nano_usd": balance}) if args.json else balance)
    return 0


def cmd_dashboard_link(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="agora dashboard-link",
                                description="Print a single-use link that signs the operator in to the dashboards "
                                            "(for whoever can reach the coordinator's database; the link expires "
                                            "after AGORA_LOGIN_LINK_S).")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="where the coordinator is reached")
    p.add_argument("--home", help="state folder of `agora up` (default ~/.agora)")
    p.add_argument("--database-url")
    args = p.parse_args(argv)
    from coordinator.db import make_engine, session_scope
    from coordinator.migrate import upgrade
    from coordinator.web_auth import Principal, issue_link

    settings = _settings(args)
    upgrade(settings.effective_database_url)
    engine = make_engine(settings.effective_database_url)
    with session_scope(engine) as s:
        token = issue_link(s, Principal("operator"), settings)
    engine.dispose()
    print(f"{args.base_url.rstrip('/')}/login/link/{token}")
    return 0


COMMANDS = {"up": cmd_up, "serve": cmd_serve, "worker": cmd_worker, "migrate": cmd_migrate,
            "account": cmd_account, "dashboard-link": cmd_dashboard_link}
