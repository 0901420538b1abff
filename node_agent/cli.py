"""`agora node ...`: run a node agent, benchmark this machine, or make a key pair; and
`agora verifier ...`: the same agent registered as an operator's verifier (never sold work).

Start-up failures a seller can fix (an unreachable upstream, a model it does not serve, a
missing model folder) are one line on stderr and exit status 1, not a traceback."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from node_agent.settings import NodeSettings, usd_per_mtok_to_nano


def _price(value: str) -> int:
    try:
        return usd_per_mtok_to_nano(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agora node", description="Sell LLM inference on an Agora market.")
    sub = p.add_subparsers(dest="cmd")
    bench = sub.add_parser("bench", help="benchmark this machine on a model and print the figures")
    keygen = sub.add_parser("keygen", help="create (or show) this node's key pair")
    keygen.add_argument("--key", dest="key_path")
    account = sub.add_parser("account", help="this node's earnings, stake and statement")
    payout = sub.add_parser("payout", help="move earnings out of the market")
    payout.add_argument("--amount", type=int, required=True, help="nano-USD")
    payout.add_argument("--idempotency-key", required=True, help="reuse it to retry safely")
    unbond = sub.add_parser("unbond", help="start withdrawing stake (paid after the unbonding delay)")
    unbond.add_argument("--amount", type=int, required=True, help="nano-USD")
    unbond.add_argument("--idempotency-key", required=True)
    audits = sub.add_parser("audits", help="this node's audits, with the evidence of each verdict")
    audits.add_argument("--limit", type=int, default=50)
    reverify = sub.add_parser("reverify", help="appeal a failed audit: other verifiers judge the job again")
    reverify.add_argument("--audit", type=int, required=True, dest="audit_id", help="the failed audit's id")
    coach = sub.add_parser("coach", help="where this node ranks, how often it wins at its price, and a suggested "
                                         "price (from the market's recorded demand)")
    coach.add_argument("--link", action="store_true", help="print a single-use link that signs this node in to "
                                                           "its dashboard page instead")
    coach.add_argument("--json", action="store_true", help="the raw report")
    for q in (account, payout, unbond, audits, reverify, coach):
        q.add_argument("--coordinator")
        q.add_argument("--key", dest="key_path")
    for q in (p, bench):
        _engine_flags(q)
    bench.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    bench.add_argument("--quick", action="store_true")
    _agent_flags(p)
    p.add_argument("--price-in", type=_price, help="USD per million prompt tokens, e.g. 0.10")
    p.add_argument("--price-out", type=_price, help="USD per million completion tokens, e.g. 0.20")
    p.add_argument("--no-bench", dest="benchmark", action="store_false", default=None,
                   help="skip the start-up benchmark (needs --tokens-per-s)")
    p.add_argument("--tokens-per-s", dest="advertised_tokens_per_s", type=float)
    p.add_argument("--max-tokens-per-s", dest="throttle_tokens_per_s", type=float,
                   help="cap each stream at this rate (sell a slice of the machine; also a test tool)")
    p.add_argument("--adversary", metavar="MODE",
                   help="TEST TOOL ONLY: make this node cheat, to exercise verification. Engine modes: "
                        "other_model, smaller_model, int4, int8, random, random_plausible, random_oracle, "
                        "truncate; agent modes: inflate_tokens, replay_receipt, overclaim_tps, overbill_prompt")
    return p


def build_verifier_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agora verifier",
        description="Run an operator's verifier: a node agent that registers verify-only (price 0), is never "
                    "sold work, and rescores other nodes' jobs for audits on any engine that can score.")
    _engine_flags(p)
    _agent_flags(p)
    return p


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset name (tiny, tiny-20m, tiny-100m), a local HF folder, "
                                   "or the upstream's model name (--engine openai)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="built-in: compute dtype (float32); openai: what the upstream computes in, if its "
                        "/v1/models does not say (bfloat16)")
    p.add_argument("--quantization", help="built-in: quantise the weights at load time and sell them as such "
                                          "(int8, or none); openai/vllm: declare the upstream's weight "
                                          "quantisation (int8, int4, fp8, awq, ...)")
    p.add_argument("--engine", choices=["builtin", "openai", "vllm"])
    p.add_argument("--upstream", help="OpenAI-compatible server for --engine openai, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--upstream-api-key", help="--engine openai: bearer token for the upstream")
    p.add_argument("--tokenizer", help="--engine openai: the model's tokenizer folder, for exact token ids")
    p.add_argument("--torch-threads", type=int)


def _agent_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", help="coordinator URL, e.g. http://host:8000")
    p.add_argument("--served-name", help="model name on the market (default: --model)")
    p.add_argument("--region", help="e.g. us-east, eu-west")
    p.add_argument("--name", help="a display name")
    p.add_argument("--operator", help="your operator name (nodes of one operator never audit each other)")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--key", dest="key_path", help="key file (default ~/.agora/node_key.pem)")
    p.add_argument("-v", "--verbose", action="store_true")


def settings_from(args: argparse.Namespace) -> NodeSettings:
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k in NodeSettings.model_fields}
    return NodeSettings(**overrides)


ENGINE_MODES = ("other_model", "smaller_model", "int4", "int8", "noise", "random", "random_plausible",
                "random_oracle", "truncate", "cheat_then_stall")  # node_agent.adversarial (imported only when used)
AGENT_MODES = ("inflate_tokens", "replay_receipt", "overclaim_tps", "overbill_prompt")


def load_engine(settings: NodeSettings):
    if settings.adversary and settings.adversary not in ENGINE_MODES + AGENT_MODES:
        raise SystemExit(f"unknown --adversary {settings.adversary!r}")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.engine == "openai" or (settings.upstream and settings.engine == "builtin"):
        from node_agent.engines.openai_compat import OpenAICompatEngine

        if not settings.upstream:
            raise SystemExit("--engine openai needs --upstream http://host:port/v1")
        return _throttled(OpenAICompatEngine(settings.upstream, model=settings.model, tokenizer_dir=settings.tokenizer,
                                             api_key=settings.upstream_api_key, dtype=settings.dtype,
                                             quantization=settings.quantization), settings)
    if settings.engine == "vllm":
        from node_agent.engines.vllm_engine import VLLMEngine

        extra = {"quantization": settings.quantization} if settings.quantization else {}
        return _throttled(VLLMEngine(settings.model, dtype=settings.dtype or "auto", **extra), settings)
    from node_agent.engines.builtin import load_builtin_engine

    quantization = None if (settings.quantization or "none").lower() == "none" else settings.quantization.lower()
    if quantization not in (None, "int8"):
        raise SystemExit(f"--quantization {settings.quantization!r}: the built-in engine quantises to int8 only "
                         "(or none)")
    if settings.adversary in ENGINE_MODES:
        from node_agent.adversarial import make_adversarial_engine

        print(f"WARNING: --adversary {settings.adversary}: this node cheats (test tool)", file=sys.stderr)
        engine = make_adversarial_engine(settings.adversary, settings.model, dtype=settings.dtype or "float32",
                                         max_batch=settings.max_concurrency)
    else:
        engine = load_builtin_engine(settings.model, device=settings.device, dtype=settings.dtype or "float32",
                                     max_batch=settings.max_concurrency, quantization=quantization)
    return _throttled(engine, settings)


def _throttled(engine, settings: NodeSettings):
    if settings.throttle_tokens_per_s:
        from node_agent.engines.throttle import ThrottledEngine

        return ThrottledEngine(engine, settings.throttle_tokens_per_s)
    return engine


async def _start_engine(settings: NodeSettings, prog: str):
    """A started engine, or None after one line on stderr saying why it could not start."""
    from node_agent.errors import EngineError

    engine = None
    try:
        engine = load_engine(settings)
        await engine.start()
        return engine
    except EngineError as exc:
        print(f"{prog}: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        if engine is not None:
            await engine.close()
        return None


async def _run_agent(settings: NodeSettings, prog: str = "agora node") -> int:
    from node_agent.agent import NodeAgent
    from node_agent.identity import Identity

    identity = Identity.load_or_create(settings.key_path)
    engine = await _start_engine(settings, prog)
    if engine is None:
        return 1
    benchmark: dict = {}
    if settings.benchmark and settings.advertised_tokens_per_s is None and not settings.verify_only:
        from node_agent.benchmark import arun_benchmark

        benchmark = await arun_benchmark(engine, quick=True, progress=sys.stderr.isatty())
    agent = NodeAgent(settings, engine, identity, benchmark=benchmark)
    role = "verifying" if settings.verify_only else "serving"
    print(f"node {identity.public_key_hex} {role} {settings.market_model} -> {settings.coordinator}",
          file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        await agent.run()
    except asyncio.CancelledError:
        pass
    finally:
        await agent.close()
        await engine.close()
    return 0


def _money_command(args: argparse.Namespace, settings: NodeSettings) -> int:
    import httpx

    from node_agent.identity import Identity
    from protocol import AccountQuery, PayoutRequest, ReverifyRequest, UnbondRequest, fresh_stamp

    me = Identity.load_or_create(settings.key_path)
    stamp = dict(node_id=me.public_key_hex, **fresh_stamp())
    if args.cmd == "account":
        path, msg = "/v1/nodes/me/account", AccountQuery(**stamp)
    elif args.cmd == "audits":
        path, msg = "/v1/nodes/me/audits", AccountQuery(**stamp, limit=args.limit)
    elif args.cmd == "coach":
        path, msg = ("/v1/nodes/me/dashboard-link" if args.link else "/v1/nodes/me/coach"), AccountQuery(**stamp)
    elif args.cmd == "reverify":
        path, msg = "/v1/nodes/me/audits/reverify", ReverifyRequest(**stamp, audit_id=args.audit_id)
    elif args.cmd == "payout":
        path, msg = "/v1/nodes/me/payouts", PayoutRequest(**stamp, amount=args.amount,
                                                          idempotency_key=args.idempotency_key)
    else:
        path, msg = "/v1/nodes/me/unbond", UnbondRequest(**stamp, amount=args.amount,
                                                         idempotency_key=args.idempotency_key)
    try:
        resp = httpx.post(settings.http_base + path, json=msg.sign(me).model_dump(mode="json"), timeout=30)
    except httpx.HTTPError as exc:
        print(f"agora node {args.cmd}: cannot reach the coordinator at {settings.http_base}: {exc}", file=sys.stderr)
        return 1
    if args.cmd == "coach" and resp.status_code == 200 and not args.json:
        body = resp.json()
        print(body["url"] if args.link else format_coach(body))
        return 0
    print(json.dumps(resp.json(), indent=2, default=str))
    return 0 if resp.status_code == 200 else 1


def format_coach(c: dict) -> str:
    """`agora node coach` in the terminal: the dashboard's coach page as text."""
    usd = 1e9
    loss = c["losses"]
    lines = [f"node {c['name']} ({c['node_id'][:16]}…), last {c['window_hours']:g} h",
             f"  routable now: {'yes' if c['routable'] else 'no — ' + str(c['not_routable_because'])}; "
             f"reputation {c['reputation']:.2f}; audits {c['audits_passed']} passed, {c['audits_failed']} failed",
             f"  earned {loss['earned_nano_usd'] / usd:.6f} USD; lost to failed audits "
             f"{(loss['clawed_back_nano_usd'] + loss['slashed_nano_usd']) / usd:.6f} USD; "
             f"{loss['failed_jobs']} failed jobs ({loss['errors_lost_nano_usd'] / usd:.6f} USD)"]
    for m in c["models"]:
        s = m["suggestion"]
        rank = (f"#{m['rank']} of {m['rank_of']}" if m["rank"] else
                f"outside the median latency target ({m['latency_target_ms']:.0f} ms)")
        win = "no data yet" if m["win_rate"] is None else f"{m['win_rate']:.0%} of {m['requests_in_market']} requests"
        lines += [f"model {m['model']}:",
                  f"  price {m['price_out_usd_per_mtok']:.4f} USD/Mtok out, {m['measured_tokens_per_s']:.0f} tok/s "
                  f"measured; rank {rank} in tokens per USD at the median latency target",
                  f"  win rate {win}; {m['minutes_backing_off']} min backing off "
                  f"({m['backoff_lost_nano_usd'] / usd:.6f} USD)",
                  f"  suggested price {s['price_out_usd_per_mtok']:.4f} USD/Mtok out: expected utilisation "
                  f"{s['expected_utilisation']:.0%} (now {s['current_utilisation']:.0%})",
                  f"  why: {s['reason']}"]
    return "\n".join(lines)


async def _bench(settings, sizes: tuple[int, ...], quick: bool) -> dict | None:
    """`agora node bench`: start the engine, measure (progress bar on stderr), stop it."""
    from node_agent.benchmark import arun_benchmark

    engine = await _start_engine(settings, "agora node bench")
    if engine is None:
        return None
    try:
        return await arun_benchmark(engine, batch_sizes=sizes, quick=quick, progress=True, refresh=True)
    finally:
        await engine.close()


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s node %(levelname)s %(message)s", stream=sys.stderr)
    if not verbose:  # one line per heartbeat is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _logging(getattr(args, "verbose", False))
    settings = settings_from(args)
    if args.cmd == "keygen":
        from node_agent.identity import Identity

        print(Identity.load_or_create(settings.key_path).public_key_hex)
        return 0
    if args.cmd in ("account", "payout", "unbond", "audits", "reverify", "coach"):
        return _money_command(args, settings)
    if args.cmd == "bench":
        try:
            sizes = tuple(int(x) for x in args.batch_sizes.split(","))
        except ValueError:
            raise SystemExit(f"--batch-sizes must be comma-separated integers, not {args.batch_sizes!r}") from None
        if not sizes or min(sizes) < 1:
            raise SystemExit("--batch-sizes must be positive")
        result = asyncio.run(_bench(settings, sizes, args.quick))
        if result is None:
            return 1
        print(json.dumps(result, indent=2))
        return 0
    if settings.price_in is None or settings.price_out is None:
        raise SystemExit("--price-in and --price-out are required")
    return asyncio.run(_run_agent(settings))


def verifier_main(argv: list[str] | None = None) -> int:
    """`agora verifier`: the node agent, registered verify-only at price 0, no benchmark."""
    args = build_verifier_parser().parse_args(argv)
    _logging(args.verbose)
    settings = settings_from(args).model_copy(update=dict(
        verify_only=True, price_in=0, price_out=0, benchmark=False, advertised_tokens_per_s=1.0))
    return asyncio.run(_run_agent(settings, "agora verifier"))
