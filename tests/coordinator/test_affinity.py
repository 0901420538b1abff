"""The coordinator's prefix map (coordinator/affinity.py) and cache-aware routing through
its routing entry: the second turn of a conversation goes to the node that served the first."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from sqlmodel import select

from coordinator.account_service import create_account
from coordinator.admission import admit
from coordinator.affinity import CHUNK_CHARS, NODES_PER_PREFIX, PrefixMap, prefix_chain
from coordinator.completions import RequestStream
from coordinator.delivery import Delivery
from coordinator.models import InferenceRequest, Node, NodeOffer
from coordinator.placement import choose
from coordinator.schemas import ChatCompletionRequest
from tests.coordinator.test_audits import _node

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 40}


def _chat(*contents: str) -> dict:
    roles = ["user", "assistant"]
    return {"messages": [SYSTEM] + [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_chat_chain_extends_the_previous_turns_chain():
    one = prefix_chain("tiny", _chat("hello"))
    two = prefix_chain("tiny", _chat("hello", "hi! how can I help?", "tell me a story"))
    assert len(one) == 2 and len(two) == 4 and two[:2] == one
    assert [s for _, s in two] == sorted(s for _, s in two)  # sizes grow with the prefix
    body = ChatCompletionRequest(model="tiny", messages=_chat("hello")["messages"])
    assert one[-1][1] == body.prompt_bytes()  # in the units routing counts prompts in
    assert prefix_chain("other", _chat("hello"))[0][0] != one[0][0]  # seeded by the model
    edited = prefix_chain("tiny", {"messages": [{"role": "system", "content": "x"}] + _chat("hello")["messages"][1:]})
    assert edited[1][0] != one[1][0]  # a changed earlier message changes every later link
    assert prefix_chain("tiny", {"messages": [{"role": "user", "content": "ab"}]}) != \
        prefix_chain("tiny", {"messages": [{"role": "use", "content": "rab"}]})


def test_a_completion_prompt_is_chained_in_chunks():
    long = "x" * (CHUNK_CHARS * 3 + 10)
    chain = prefix_chain("tiny", {"prompt": long})
    assert len(chain) == 4 and chain[2][1] == 3 * CHUNK_CHARS
    longer = prefix_chain("tiny", {"prompt": long + "more words"})
    assert longer[:3] == chain[:3] and longer[3] != chain[3]
    assert prefix_chain("tiny", {"prompt": ""}) == [] and prefix_chain("tiny", {}) == []


def test_lookup_finds_each_nodes_longest_prefix():
    m = PrefixMap()
    turn1 = prefix_chain("tiny", _chat("hello"))
    turn2 = prefix_chain("tiny", _chat("hello", "hi", "more"))
    assert m.lookup(turn2) == ()
    m.record(turn1, "a")
    m.record(turn2[:1], "b")  # b holds only the system prompt
    assert m.lookup(turn2) == (("a", turn1[-1][1]), ("b", turn1[0][1]))
    m.record(turn2, "b")
    assert m.lookup(turn2)[0] == ("b", turn2[-1][1])
    other = prefix_chain("tiny", {"messages": [{"role": "user", "content": "unrelated"}]})
    assert m.lookup(other) == ()


def test_entries_expire_after_the_ttl_and_the_map_is_bounded():
    clock = Clock()
    m = PrefixMap(max_entries=5, ttl_s=60.0, clock=clock)
    chain = prefix_chain("tiny", _chat("hello"))
    m.record(chain, "a")
    clock.t += 59.0
    assert m.lookup(chain) == (("a", chain[-1][1]),)
    clock.t += 2.0
    assert m.lookup(chain) == ()
    for i in range(10):  # LRU: at most max_entries prefixes, the oldest go first
        m.record(prefix_chain("tiny", {"messages": [{"role": "user", "content": f"q{i}"}]}), "a")
    assert len(m) == 5
    assert m.lookup(prefix_chain("tiny", {"messages": [{"role": "user", "content": "q0"}]})) == ()
    assert m.lookup(prefix_chain("tiny", {"messages": [{"role": "user", "content": "q9"}]})) != ()
    shared = prefix_chain("tiny", _chat("hello"))[:1]
    for k in range(NODES_PER_PREFIX + 2):  # a prefix many nodes hold keeps the newest few
        m.record(shared, f"n{k}")
    assert {n for n, _ in m.lookup(shared)} == {f"n{k}" for k in range(2, NODES_PER_PREFIX + 2)}


def test_node_reports_withdraw_evicted_prefixes_and_renew_held_ones():
    clock = Clock()
    m = PrefixMap(ttl_s=60.0, clock=clock)
    t1, t2 = prefix_chain("tiny", _chat("hello")), prefix_chain("tiny", _chat("bye"))
    m.record(t1, "a")
    m.record(t2, "a")
    m.record(t1, "b")
    clock.t += 50.0
    m.report("a", held=[k for k, _ in t1], drop=[k for k, _ in t2[1:]])  # a evicted the second conversation
    assert dict(m.lookup(t2)) == {"a": t2[0][1], "b": t2[0][1]}  # only the shared system prompt is left
    clock.t += 50.0  # past the TTL since routing: a's report renewed its pair, b's expired
    assert m.lookup(t1) == (("a", t1[-1][1]),)
    m.report("a", held=[t1[0][0]], full=True)  # a full report: only the system prompt is left
    assert m.lookup(t1) == (("a", t1[0][1]),)
    m.forget_node("a")
    assert m.lookup(t1) == ()


def test_a_node_cannot_claim_a_prefix_it_was_never_routed():
    """The attack: a seller reports a popular prompt's prefixes to attract its conversations."""
    m = PrefixMap()
    popular = prefix_chain("tiny", _chat("the popular system prompt"))
    m.record(popular, "honest")
    m.report("liar", held=[k for k, _ in popular], full=True)
    assert m.lookup(popular) == (("honest", popular[-1][1]),)


def test_a_completed_stream_records_its_prompt_for_its_node():
    m = PrefixMap()
    added = []
    rt = SimpleNamespace(affinity=m, endings=SimpleNamespace(add=lambda e, loop: added.append(e)))
    payload = _chat("hello")

    async def end(delivery):
        stream = RequestStream.__new__(RequestStream)
        stream.rt, stream.rid, stream.node_id, stream.prompt = rt, "req_1", "node-a", ("tiny", payload)
        stream.finish(5, delivery)

    asyncio.run(end(Delivery.BUYER_GONE))  # the buyer left: nothing to remember
    assert len(m) == 0 and len(added) == 1
    asyncio.run(end(Delivery.COMPLETE))
    assert m.lookup(prefix_chain("tiny", _chat("hello", "hi", "again")))[0][0] == "node-a"


def _chat_request(runtime, payload: dict) -> InferenceRequest:
    with runtime.session() as s:
        account, _ = create_account(s, "buyer", 10**9)
        body = ChatCompletionRequest(model="tiny", max_tokens=16, **payload)
        return admit(s, account, body, "chat", runtime.settings).request


def _benchmarked(runtime, node_id: str) -> None:
    with runtime.session() as s:
        node = s.get(Node, node_id)
        node.benchmark = {"batches": [{"batch": 1, "prefill_tok_s": 200.0, "decode_tok_s": 100.0}]}
        offer = s.exec(select(NodeOffer).where(NodeOffer.node_id == node_id)).one()
        offer.ttft_ms = 800.0
        s.add(node), s.add(offer)


def test_the_second_turn_goes_to_the_node_that_served_the_first(runtime):
    a, b = _node(runtime, "one").public_key_hex, _node(runtime, "two").public_key_hex
    for nid in (a, b):
        _benchmarked(runtime, nid)
    first = _chat_request(runtime, _chat("hello"))
    with runtime.session() as s:
        picked = choose(s, s.get(InferenceRequest, first.id), runtime.settings, affinity=runtime.affinity)
        s.delete(s.get(InferenceRequest, first.id))  # served and gone (no longer queued)
    assert picked in (a, b)
    other = b if picked == a else a  # the node the tie would not give it
    runtime.affinity.record(prefix_chain("tiny", first.payload), other)
    second = _chat_request(runtime, _chat("hello", "hi! how can I help?", "tell me more"))
    with runtime.session() as s:
        req = s.get(InferenceRequest, second.id)
        assert choose(s, req, runtime.settings, affinity=runtime.affinity) == other
        assert choose(s, req, runtime.settings) == picked  # without the map: the tie as before
