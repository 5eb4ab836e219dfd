"""
Issue 17: C{loading_events: true} on a C{route_by: model} service.

Live: a streaming OpenAI chat request held through a cold start gets its
response headers and SSE comment keep-alives while it waits, then the model's
own stream; a failed start ends that stream with an error event the official
client raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import StartHestia
from support.hestiaproc import BackendSpec

from hestia.config import ConfigError
from hestia.loader import parse_config

CHAT: dict[str, Any] = {"model": "llama3:8b", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def router(slow: BackendSpec, broken: BackendSpec, **settings: Any) -> dict[str, Any]:
    return {"services": {
        "ai": {"route_by": "model", "loading_events": True, **settings},
        # Loads for 5 s: more than two keep-alive intervals.
        "llama": {**slow.service("--start-delay", "5", "--models", "llama3:8b"), "models": ["llama3:8b"]},
        "broken": {**broken.service("--fail-start", "3", "--models", "bad:1b"), "models": ["bad:1b"]},
    }}


@pytest.mark.unit
def test_loading_events_is_a_router_boolean() -> None:
    base = {"url": "http://127.0.0.1:9", "models": ["a"]}
    plan = parse_config({"services": {"ai": {"route_by": "model", "loading_events": "yes"}, "t": base}},
                        "c.yml", environ={}).routing
    assert plan.model_routes["ai"].loading_events is True
    with pytest.raises(ConfigError, match=r"c.yml: services.t.loading_events: only a route_by: model service"):
        parse_config({"services": {"t": {**base, "loading_events": True}}}, "c.yml", environ={})
    with pytest.raises(ConfigError, match=r"c.yml: services.ai.loading_events: expected true or false"):
        parse_config({"services": {"ai": {"route_by": "model", "loading_events": 2}, "t": base}},
                     "c.yml", environ={})


@pytest.mark.integration
def test_a_held_stream_gets_headers_and_keep_alives_then_the_model(hestia: StartHestia, tmp_path: Path) -> None:
    slow, broken = BackendSpec("llama", tmp_path), BackendSpec("broken", tmp_path)
    gw = hestia(router(slow, broken))
    comments: list[str] = []
    events: list[Any] = []
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=60) as http, http.stream(
        "POST", "/services/ai/v1/chat/completions", json=CHAT
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-hestia-state"] == "starting"
        assert gw.state("llama") == "starting"  # the headers came before the model was up
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
                assert not events  # keep-alives come while waiting, not in the model's stream
            elif line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert comments[0] == ": hestia: the model is loading"
    assert comments.count(": hestia: still loading") >= 1, comments
    assert events[-1] == "[DONE]"
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in map(json.loads, events[:-1])
                   if chunk["choices"])
    assert text == "hello from llama"
    assert slow.starts() == 1

    # Warm now: no early headers, the backend's own response.
    with httpx.Client(base_url=gw.url, trust_env=False, timeout=60) as http, http.stream(
        "POST", "/services/ai/v1/chat/completions", json=CHAT
    ) as response:
        assert "x-hestia-state" not in response.headers
        assert not [line for line in response.iter_lines() if line.startswith(":")]


@pytest.mark.integration
def test_the_official_client_streams_through_it_and_sees_a_failed_start(
    hestia: StartHestia, tmp_path: Path
) -> None:
    slow, broken = BackendSpec("llama", tmp_path), BackendSpec("broken", tmp_path)
    gw = hestia(router(slow, broken))
    client = openai.OpenAI(base_url=f"{gw.url}/services/ai/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(trust_env=False, timeout=60))
    chunks = list(client.chat.completions.create(model="llama3:8b", messages=CHAT["messages"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello from llama"

    with pytest.raises(openai.APIError) as failed:
        list(client.chat.completions.create(model="bad:1b", messages=CHAT["messages"], stream=True))
    assert "broken" in failed.value.message and "exit" in failed.value.message, failed.value.message
    assert gw.state("broken") == "failed"
    # A non-streaming request is not held open: a plain JSON error as usual.
    with pytest.raises(openai.APIStatusError) as plain:
        client.chat.completions.create(model="bad:1b", messages=CHAT["messages"])
    assert plain.value.status_code == 502
