"""
Issue 7, "Must show", against a real ``twistd -n hestia`` and real backends.

  - the official C{ollama} and C{openai} clients, pointed at ONE Hestia
    endpoint, stream from two models served by two different cold backends;
  - a third-party strategy (strategies/hestia-time-window, installed editable
    by ``./scripts/dev.sh setup``) is found through its entry point;
  - an exclusive group under alternating concurrent load: nothing lost, a
    bounded number of swaps, never both members up at once;
  - a dependency is ready before its dependent starts.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from conftest import StartHestia, require
from support.hestiaproc import BackendSpec, free_port, read_request_log

pytestmark = pytest.mark.integration


def test_one_endpoint_two_models_two_cold_backends(hestia: StartHestia, tmp_path: Path) -> None:
    llama, qwen = BackendSpec("llama", tmp_path), BackendSpec("qwen", tmp_path)
    gw = hestia({"services": {
        "ai": {"route_by": "model"},
        "llama": {**llama.service("--start-delay", "0.3", "--models", "llama3:8b", "--token-interval", "0.02"),
                  "models": ["llama3:8b"]},
        "qwen": {**qwen.service("--start-delay", "0.3", "--models", "qwen2.5:7b", "--token-interval", "0.02"),
                 "models": ["qwen2.5:7b"]},
    }})
    client = ollama.Client(host=f"{gw.url}/services/ai", trust_env=False, timeout=30)
    assert [m.model for m in client.list().models] == ["llama3:8b", "qwen2.5:7b"]
    assert llama.starts() == qwen.starts() == 0  # the list started nothing

    parts = list(client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert len(parts) > 2 and "".join(p.message.content or "" for p in parts) == "hello from llama"
    assert (llama.starts(), qwen.starts()) == (1, 0)

    oai = openai.OpenAI(base_url=f"{gw.url}/services/ai/v1", api_key="unused", max_retries=0,
                        http_client=httpx.Client(trust_env=False, timeout=30))
    chunks = list(oai.chat.completions.create(model="qwen2.5:7b", messages=[{"role": "user", "content": "hi"}],
                                              stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello from qwen"
    assert (llama.starts(), qwen.starts()) == (1, 1)
    assert [m.id for m in oai.models.list().data] == ["llama3:8b", "qwen2.5:7b"]

    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="mistral:7b", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "mistral:7b" in missing.value.error
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.chat.completions.create(model="mistral:7b", messages=[{"role": "user", "content": "hi"}])
    assert not_found.value.code == "model_not_found"

    status = gw.status("ai")
    assert status["route_by"] == "model"
    assert {t["name"]: t["state"] for t in status["targets"]} == {"llama": "ready", "qwen": "ready"}


def test_third_party_strategy_is_found_through_its_entry_point(hestia: StartHestia, tmp_path: Path) -> None:
    require(bool(list(entry_points(group="hestia.strategies", name="time-window"))),
            "hestia-time-window not installed: run ./scripts/dev.sh setup")
    local, night = BackendSpec("local", tmp_path), BackendSpec("night", tmp_path)
    gw = hestia({"services": {"llm": {
        # A window covering the whole day: the preferred, dearer instance wins.
        "strategy": {"name": "time-window", "prefer": [1], "start": "00:00", "end": "00:00", "utc": True},
        "instances": [{**local.service(), "cost": 1}, {**night.service(), "cost": 10}],
    }}})
    assert gw.status("llm")["strategy"] == "time-window"
    answer = gw.http.get("/services/llm/health")
    assert answer.status_code == 200 and answer.json()["name"] == "night"
    assert (local.starts(), night.starts()) == (0, 1)
    instances = gw.status("llm")["instances"]
    assert [(i["name"], i["state"]) for i in instances] == [("llm.0", "stopped"), ("llm.1", "ready")]


def test_failover_moves_to_the_next_instance_when_one_cannot_start(hestia: StartHestia, tmp_path: Path) -> None:
    broken, spare = BackendSpec("broken", tmp_path), BackendSpec("spare", tmp_path)
    gw = hestia({"services": {"llm": {
        "strategy": "failover",
        "instances": [broken.service("--fail-start", "3"), spare.service()],
    }}})
    answer = gw.http.get("/services/llm/health")
    assert answer.status_code == 200 and answer.json()["name"] == "spare"
    states = [i["state"] for i in gw.status("llm")["instances"]]
    assert states == ["failed", "ready"]


def test_failover_moves_on_when_a_ready_instance_refuses_the_connection(
    hestia: StartHestia, tmp_path: Path
) -> None:
    spare = BackendSpec("spare", tmp_path)
    # The first instance is an always-on upstream that is down: "ready" as far
    # as Hestia knows, but nothing listens.
    gw = hestia({"services": {"llm": {
        "strategy": "failover",
        "instances": [{"url": f"http://127.0.0.1:{free_port()}"}, spare.service()],
    }}})
    for method in ("GET", "POST"):  # A refused connect is safe to resend, whatever the method.
        answer = gw.http.request(method, "/services/llm/echo", content=b"payload")
        assert answer.status_code == 200, answer.text
        assert answer.json()["body"] == "payload"
    assert [r["method"] for r in spare.requests("/echo")] == ["GET", "POST"]
    assert gw.status("llm")["in_flight"] == 0


def test_exclusive_group_under_alternating_concurrent_load(hestia: StartHestia, tmp_path: Path) -> None:
    a, b = BackendSpec("a", tmp_path), BackendSpec("b", tmp_path)
    gw = hestia({
        "groups": {"gpu0": {"exclusive": True, "min_residency": 0.5}},
        "services": {
            "a": {**a.service("--start-delay", "0.1"), "group": "gpu0"},
            "b": {**b.service("--start-delay", "0.1"), "group": "gpu0"},
        },
    })
    both_up: list[dict[str, Any]] = []  # moments both ran
    done = threading.Event()

    def watch() -> None:
        # The rule, at the process level: never both members' processes alive.
        # Samples are not atomic: a alive before and after b was seen alive
        # means both ran at the moment b was sampled (and the same way round).
        while not done.is_set():
            first, second, third = a.running(), b.running(), a.running()
            if first and second and third:
                both_up.append({"a": first, "b": second})
            first, second, third = b.running(), a.running(), b.running()
            if first and second and third:
                both_up.append({"b": first, "a": second})
            done.wait(0.01)

    def one(index: int) -> tuple[str, int, str]:
        name = "ab"[index % 2]
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=60) as http:
            response = http.get(f"/services/{name}/health", params={"i": index})
            return name, response.status_code, response.text

    watcher = threading.Thread(target=watch)
    watcher.start()
    began = time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(40)))
    finally:
        elapsed = time.monotonic() - began
        done.set()
        watcher.join()
    assert [status for _, status, _ in answers] == [200] * 40, answers
    assert not both_up, both_up[:3]
    swaps = gw.status("a")["group"]["swaps"]
    # It did alternate, but each holder kept the group for min_residency
    # (0.5 s): never more swaps than that allows, and far fewer than requests.
    assert 1 <= swaps <= elapsed / 0.5 + 1 and swaps < 20, (swaps, elapsed)
    assert a.starts() + b.starts() == swaps + 1


def test_dependency_is_ready_before_the_dependent_starts(hestia: StartHestia, tmp_path: Path) -> None:
    app, db = BackendSpec("app", tmp_path), BackendSpec("db", tmp_path)
    gw = hestia({"services": {
        "app": {**app.service(), "depends_on": ["db"]},
        "db": db.service("--start-delay", "0.4", timed=True),
    }})
    assert gw.http.get("/services/app/health").status_code == 200
    db_ready = min(e["t"] for e in read_request_log(db.request_log) if e["path"] == "/health")
    # app's command ran after db answered its health check.  File times come from
    # the kernel's coarse clock (a few ms behind time.time()), hence the slack;
    # starting app early would put it ~0.4 s (db's start delay) before db_ready.
    assert app.start_file.stat().st_mtime >= db_ready - 0.02
    assert (app.starts(), db.starts()) == (1, 1)
    # Stopping app releases db, which then idle-stops normally; stopping db alone is the API's call.
    gw.http.post("/v1/services/app/stop").raise_for_status()
    assert gw.state("db") == "ready"
    assert json.loads(gw.http.get("/v1/services/db/status").text)["in_flight"] == 0
