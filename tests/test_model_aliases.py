"""
Issue 17: the Anthropic Messages API and aliases in C{route_by: model}.

Live: the official C{anthropic}, C{openai} and C{ollama} clients, pointed at
ONE C{/services/<router>}, each reach the right cold backend; an alias reaches
the real model under its real name and is listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from conftest import StartHestia
from support.hestiaproc import BackendSpec

from hestia.config import ConfigError
from hestia.loader import parse_config


def parse(document: dict[str, Any]) -> Any:
    return parse_config(document, "hestia_config.yml", environ={})


def targets(**router: Any) -> dict[str, Any]:
    return {"services": {
        "ai": {"route_by": "model", **router},
        "llama": {"url": "http://127.0.0.1:9", "models": ["llama3:8b"]},
        "qwen": {"url": "http://127.0.0.1:10", "models": ["qwen2.5:7b"]},
    }}


@pytest.mark.unit
def test_aliases_parse_to_the_real_models() -> None:
    plan = parse(targets(aliases={"gpt-4o-mini": "qwen2.5:7b", "claude-haiku": "llama3:8b"})).routing
    assert plan.model_routes["ai"].aliases == {"gpt-4o-mini": "qwen2.5:7b", "claude-haiku": "llama3:8b"}


@pytest.mark.unit
@pytest.mark.parametrize(("aliases", "expected"), [
    ({"gpt-4o-mini": "mistral:7b"},
     "services.ai.aliases.gpt-4o-mini: 'mistral:7b' is not a model of the targets (models: llama3:8b, qwen2.5:7b)"),
    ({"llama3:8b": "qwen2.5:7b"}, "services.ai.aliases.llama3:8b: 'llama3:8b' is a model llama lists, not an alias"),
    ({"gpt": 3}, "services.ai.aliases: expected alias: model names, got 'gpt': 3"),
    (["gpt"], "services.ai.aliases: expected a mapping"),
])
def test_alias_errors_name_the_key(aliases: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(targets(aliases=aliases))
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"hestia_config.yml: {expected}")


@pytest.mark.unit
def test_aliases_only_on_a_router() -> None:
    with pytest.raises(ConfigError, match="services.llama.aliases: only a route_by: model service has aliases"):
        parse({"services": {"llama": {"url": "http://127.0.0.1:9", "models": ["a"], "aliases": {"b": "a"}}}})


@pytest.mark.integration
def test_three_official_clients_one_endpoint_three_cold_backends(hestia: StartHestia, tmp_path: Path) -> None:
    llama, qwen, claude = (BackendSpec(name, tmp_path) for name in ("llama", "qwen", "claude"))
    gw = hestia({"services": {
        "ai": {"route_by": "model", "aliases": {"gpt-4o-mini": "qwen2.5:7b", "claude-3-5-haiku": "haiku:3b"}},
        "llama": {**llama.service("--start-delay", "0.3", "--models", "llama3:8b", "--token-interval", "0.02"),
                  "models": ["llama3:8b"]},
        "qwen": {**qwen.service("--start-delay", "0.3", "--models", "qwen2.5:7b", "--token-interval", "0.02"),
                 "models": ["qwen2.5:7b"]},
        "claude": {**claude.service("--start-delay", "0.3", "--models", "haiku:3b", "--token-interval", "0.02"),
                   "models": ["haiku:3b"]},
    }})
    base = f"{gw.url}/services/ai"
    every = ["llama3:8b", "qwen2.5:7b", "haiku:3b", "gpt-4o-mini", "claude-3-5-haiku"]
    messages: Any = [{"role": "user", "content": "hi"}]

    # Anthropic: streaming events through a cold start, then a plain reply.
    claude_client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0,
                                        http_client=anthropic.DefaultHttpxClient(trust_env=False, timeout=30))
    assert [m.id for m in claude_client.models.list().data] == every
    assert (llama.starts(), qwen.starts(), claude.starts()) == (0, 0, 0)  # listing starts nothing
    with claude_client.messages.stream(model="haiku:3b", max_tokens=32, messages=messages) as stream:
        assert "".join(stream.text_stream) == "hello from claude"
    assert (llama.starts(), qwen.starts(), claude.starts()) == (0, 0, 1)
    reply = claude_client.messages.create(model="claude-3-5-haiku", max_tokens=32, messages=messages)
    assert reply.model == "haiku:3b"  # the alias reached the real model, under its real name
    assert "".join(block.text for block in reply.content) == "hello from claude"
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude_client.messages.create(model="claude-opus", max_tokens=32, messages=messages)
    assert missing.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                             "message": "model 'claude-opus' not found"}}
    with pytest.raises(anthropic.BadRequestError) as no_model:
        claude_client.post("/v1/messages", body={"max_tokens": 5, "messages": messages}, cast_to=httpx.Response)
    assert no_model.value.body["error"]["type"] == "invalid_request_error"

    # OpenAI, by alias: the qwen backend gets qwen2.5:7b (it knows no other name).
    oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                        http_client=httpx.Client(trust_env=False, timeout=30))
    assert [m.id for m in oai.models.list().data] == every
    assert {m.id: m.owned_by for m in oai.models.list().data}["gpt-4o-mini"] == "qwen"
    chunks = list(oai.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello from qwen"
    assert {c.model for c in chunks} == {"qwen2.5:7b"}
    assert (llama.starts(), qwen.starts(), claude.starts()) == (0, 1, 1)

    # Ollama.
    client = ollama.Client(host=base, trust_env=False, timeout=30)
    assert [m.model for m in client.list().models] == every
    parts = list(client.chat(model="llama3:8b", messages=messages, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "hello from llama"
    assert client.chat(model="gpt-4o-mini", messages=messages).model == "qwen2.5:7b"
    assert (llama.starts(), qwen.starts(), claude.starts()) == (1, 1, 1)
    # Each backend saw only its own API's requests.
    assert {r["path"] for r in claude.requests()} - {"/health"} == {"/v1/messages"}
    assert {r["path"] for r in qwen.requests()} - {"/health"} == {"/v1/chat/completions", "/api/chat"}
