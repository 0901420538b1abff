"""`agora node` flags: prices parse exactly, each backend is built from its flags, bad
input is a clear error, and the adversary modes the CLI knows are the test tool's."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_builtin_quantization_flag_quantises_and_is_declared(tmp_path, monkeypatch):
    """`--quantization int8` on the built-in engine quantises the weights at load time and
    the offer says so (dtype as before); anything but int8/none is refused at start-up."""
    from node_agent.agent import capabilities
    from node_agent.engines.builtin.linear import Int8Linear

    monkeypatch.setenv("AGORA_HOME", str(tmp_path))
    eng = load_engine(_settings("--model", "tiny", "--quantization", "int8", "--max-concurrency", "2"))
    assert eng.quantization == "int8" and isinstance(eng.model.layers[0].qkv, Int8Linear)
    assert capabilities(eng)["quantization"] == "int8" and capabilities(eng)["dtype"] == "float32"
    plain = load_engine(_settings("--model", "tiny", "--quantization", "none", "--max-concurrency", "2"))
    assert plain.quantization is None and capabilities(plain)["quantization"] is None
    assert eng.bench_key != plain.bench_key
    with pytest.raises(SystemExit, match="int8"):
        load_engine(_settings("--model", "tiny", "--quantization", "int4"))


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


def _agora(*argv: str, home) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    return subprocess.run([sys.executable, "-m", "agora", *argv], capture_output=True, text=True, timeout=120,
                          env=dict(env, AGORA_HOME=str(home)), stdin=subprocess.DEVNULL)


def test_upstream_problems_are_one_line_and_status_1(tmp_path):
    """A seller's typo or a server that is down: one line saying so, exit 1, no traceback."""
    from tests.node_agent.upstreams import free_port, upstreams

    with upstreams("fixed") as ups:
        common = ("--coordinator", f"http://127.0.0.1:{free_port()}", "--key", str(tmp_path / "k.pem"),
                  "--engine", "openai")
        runs = {
            "node_wrong_model": _agora("node", *common, "--upstream", ups["fixed"], "--model", "nope",
                                       "--price-in", "0.1", "--price-out", "0.2", home=tmp_path),
            "node_unreachable": _agora("node", *common, "--upstream", f"http://127.0.0.1:{free_port()}/v1",
                                       "--model", "tiny", "--price-in", "0.1", "--price-out", "0.2", home=tmp_path),
            "verifier_wrong_model": _agora("verifier", *common, "--upstream", ups["fixed"], "--model", "nope",
                                           home=tmp_path),
        }
    for name, out in runs.items():
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, (name, out.stderr)
    assert runs["node_wrong_model"].stderr.startswith("agora node: upstream http://127.0.0.1:")
    assert "does not serve 'nope' (it serves 'tiny')" in runs["node_wrong_model"].stderr
    assert "unreachable" in runs["node_unreachable"].stderr
    assert runs["verifier_wrong_model"].stderr.startswith("agora verifier: ")


def test_verifier_flags_make_a_verify_only_node():
    from node_agent.cli import build_verifier_parser

    args = build_verifier_parser().parse_args(["--engine", "openai", "--upstream", "http://h/v1", "--model", "m",
                                               "--operator", "ops", "--quantization", "awq"])
    s = settings_from(args)
    assert (s.engine, s.upstream, s.model, s.operator, s.quantization, s.dtype) == (
        "openai", "http://h/v1", "m", "ops", "awq", None)
    eng = load_engine(s)
    assert (eng.quantization, eng.dtype) == ("awq", "bfloat16")  # until /v1/models says otherwise
