"""
Issue 2, "Must show": unchanged official clients work through Hestia from a cold start.

The C{ollama} service is a real ``tests/support/backend.py`` (which speaks the Ollama
API, and OpenAI's under C{/v1}) that Hestia starts on the client's first call.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import ollama
import openai
import pytest
from conftest import StartHestia
from support.hestiaproc import BackendSpec

pytestmark = pytest.mark.integration


def test_ollama_client_lists_models_and_streams_a_chat_from_cold(hestia: StartHestia, tmp_path: Path) -> None:
    backend = BackendSpec("ollama", tmp_path)
    gw = hestia({"services": {"ollama": {
        **backend.service("--start-delay", "0.3", "--models", "llama3:8b,qwen2:0.5b", "--token-interval", "0.05"),
        "health": {"path": "/api/tags"},
    }}})
    assert gw.state("ollama") == "stopped"

    client = ollama.Client(host=f"{gw.url}/services/ollama", trust_env=False, timeout=30)
    models = client.list()
    assert [m.model for m in models.models] == ["llama3:8b", "qwen2:0.5b"]
    assert backend.starts() == 1  # the list call started it

    gw.http.post("/v1/services/ollama/stop").raise_for_status()
    assert gw.state("ollama") == "stopped"
    parts = list(client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert len(parts) > 2  # streamed, not one answer
    assert "".join(part.message.content or "" for part in parts) == "hello from ollama"
    assert parts[-1].done and not any(part.done for part in parts[:-1])
    assert backend.starts() == 2  # cold again for the chat
    chats = backend.requests("/api/chat")
    assert len(chats) == 1 and chats[0]["method"] == "POST"


def test_openai_client_through_the_same_gateway(hestia: StartHestia, tmp_path: Path) -> None:
    backend = BackendSpec("llm", tmp_path)
    gw = hestia({"services": {"llm": backend.service("--start-delay", "0.2")}})
    client = openai.OpenAI(
        base_url=f"{gw.url}/services/llm/v1", api_key="unused", max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=30),
    )
    stream = client.chat.completions.create(
        model="llama3:8b", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "hello from llm"
    assert backend.starts() == 1
