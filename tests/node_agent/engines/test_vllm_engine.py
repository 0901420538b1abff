"""The vLLM backend imports lazily and explains itself when vLLM is absent."""

from __future__ import annotations

import importlib

import pytest

from node_agent.errors import EngineError


def test_module_imports_without_vllm_and_constructor_says_how_to_install():
    mod = importlib.import_module("node_agent.engines.vllm_engine")
    if mod.vllm_available():
        pytest.skip("vLLM is installed here")
    with pytest.raises(EngineError, match="pip install"):
        mod.VLLMEngine("some/model")
