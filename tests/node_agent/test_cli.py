"""`agora node` flags: prices parse exactly, each backend is built from its flags, bad
input is a clear error, and the adversary modes the CLI knows are the test tool's."""

from __future__ import annotations

import pytest

from node_agent import adversarial
from node_agent.cli import AGENT_MODES, ENGINE_MODES, build_parser, load_engine, settings_from
from node_agent.errors import EngineError
from node_agent.settings import usd_per_mtok_to_nano


def _settings(*argv: str):
    return settings_from(build_parser().parse_args(list(argv)))


def test_prices_are_exact_integers():
    s = _settings("--price-in", "0.10", "--price-out", "0.000000001")
    assert (s.price_in, s.price_out) == (100_000_000, 1)
    for bad in ("-1", "abc", "0.0000000001", "nan"):
        with pytest.raises(ValueError):
            usd_per_mtok_to_nano(bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--price-in", "-0.5"])


def test_each_backend_is_built_from_its_flags():
    from node_agent.engines.openai_compat import OpenAICompatEngine
    from node_agent.engines.throttle import ThrottledEngine

    eng = load_engine(_settings("--engine", "openai", "--upstream", "http://127.0.0.1:9/v1", "--model", "m"))
    assert isinstance(eng, OpenAICompatEngine) and eng.upstream == "http://127.0.0.1:9/v1"
    slow = load_engine(_settings("--upstream", "http://127.0.0.1:9/v1", "--max-tokens-per-s", "5"))
    assert isinstance(slow, ThrottledEngine) and isinstance(slow.inner, OpenAICompatEngine)
    with pytest.raises(SystemExit):
        load_engine(_settings("--engine", "openai"))  # no upstream
    with pytest.raises(EngineError, match="vLLM"):  # not installed here: a clear message
        load_engine(_settings("--engine", "vllm", "--model", "tiny"))
    with pytest.raises(SystemExit):
        load_engine(_settings("--adversary", "sneaky"))


def test_cli_adversary_modes_match_the_test_tool():
    assert ENGINE_MODES == adversarial.ENGINE_MODES
    assert set(AGENT_MODES) == set(adversarial.AGENT_MODES)


def test_node_bench_command_prints_the_figures(tmp_path, monkeypatch, capsys):
    import json

    from node_agent.cli import main

    monkeypatch.setenv("AGORA_HOME", str(tmp_path))
    assert main(["bench", "--model", "tiny", "--quick"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny" and out["summary"]["tokens_per_s"] > 0
    assert [b["batch"] for b in out["batches"]] == [1, 8] and out["roofline"]["fraction_b1"] > 0
    with pytest.raises(SystemExit, match="batch-sizes"):
        main(["bench", "--model", "tiny", "--batch-sizes", "1,x"])
