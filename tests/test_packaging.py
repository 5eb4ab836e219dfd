"""
Hestia installed as users install it, and the files it ships.

The wheel is built from this checkout by pip (C{pip install .} and the Dockerfile
do the same); a new virtualenv gets it and its dependencies with no index and must
run C{twistd -n hestia}.  An editable install (C{dev.sh setup}) found the plugin in
C{src/twisted/plugins} and hid that the wheel had none.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import StartHestia
from support.hestiaproc import VENV_BIN, free_port, wait_for
from support.wheelhouse import REPO, build_wheelhouse, fresh_venv, wheel_files

from hestia import __version__


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield build_wheelhouse(tmp_path_factory.mktemp("wheelhouse")).parent


@pytest.mark.integration
def test_the_wheel_carries_the_plugin_the_ui_and_py_typed(wheelhouse: Path) -> None:
    files = wheel_files(next(wheelhouse.glob("hestia-*.whl")))
    assert "twisted/plugins/hestia_plugin.py" in files
    assert "twisted/__init__.py" not in files  # Twisted's own: a namespace part only
    assert "twisted/plugins/__init__.py" not in files
    ui = {name for name in files if name.startswith("hestia/ui/")}
    shipped = {f"hestia/ui/{p.name}" for p in (REPO / "src/hestia/ui").iterdir() if p.is_file()}
    assert shipped <= ui, shipped - ui
    assert {"hestia/ui/index.html", "hestia/ui/dashboard.js", "hestia/ui/openapi.yaml"} <= ui
    assert "hestia/py.typed" in files
    assert "hestia/demo.py" in files
    assert not any("dropin.cache" in name or "__pycache__" in name for name in files)


@pytest.mark.integration
def test_a_fresh_venv_with_the_wheel_runs_twistd_hestia(wheelhouse: Path, tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "venv", wheelhouse)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    where = subprocess.run([str(bin_dir / "python"), "-c", "import hestia, sys; print(hestia.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout  # the wheel, not this checkout
    version = subprocess.run([str(bin_dir / "hestia"), "--version"], capture_output=True, text=True, env=env,
                             check=True)
    assert version.stdout == f"hestia {__version__}\n"

    port = free_port()
    config = tmp_path / "hestia_config.yml"
    config.write_text(yaml.safe_dump({"server": {"listen": f"tcp:{port}:interface=127.0.0.1",
                                                 "state_path": "state.db"}}))
    log = (tmp_path / "twistd.log").open("wb")
    proc = subprocess.Popen([str(bin_dir / "twistd"), "-n", "--pidfile=", "hestia", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        assert wait_for(healthy, 30.0, 0.05)
        assert proc.poll() is None, (tmp_path / "twistd.log").read_text()
        health = httpx.get(f"http://127.0.0.1:{port}/v1/health", trust_env=False).json()
        assert health["version"] == __version__
        ui = httpx.get(f"http://127.0.0.1:{port}/v1/ui/", trust_env=False)
        assert ui.status_code == 200 and "<html" in ui.text.lower()  # package data, from the wheel
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


# -- the shipped configurations ----------------------------------------------------


def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


@pytest.mark.unit
def test_the_development_config_listens_on_loopback_and_the_compose_one_everywhere() -> None:
    assert shipped("hestia_config.yml")["server"]["listen"].endswith(":interface=127.0.0.1")
    # Inside its container Hestia must answer the published port, which arrives on eth0.
    assert shipped("contrib/compose/hestia_config.yml")["server"]["listen"] == "tcp:8080"
    for config in ("hestia_config.yml", "contrib/compose/hestia_config.yml"):
        demo = shipped(config)["services"]["demo"]
        assert demo["command"][0] == "hestia-demo", config
        assert "http.server" not in demo["command"]


@pytest.mark.integration
def test_the_shipped_demo_serves_its_own_page_and_nothing_of_the_checkout(hestia: StartHestia,
                                                                         tmp_path: Path) -> None:
    config = shipped("hestia_config.yml")
    demo = config["services"]["demo"]
    port = free_port()  # the shipped 8765, moved so that parallel runs do not collide
    demo["url"] = demo["url"].replace("8765", str(port))
    demo["command"] = [str(part).replace("8765", str(port)) for part in demo["command"]]
    config = {"server": {"state_path": "hestia.db"}, "services": {"demo": demo}}
    gw = hestia(config, env={"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
    # What a checkout holds, in the directory the demo is started from.
    cwd = gw.dir / "cwd"
    (cwd / ".git").mkdir(parents=True, exist_ok=True)
    (cwd / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (cwd / "hestia_config.yml").write_text("secret: yes\n")
    assert gw.state("demo") == "stopped"
    page = gw.http.get("/services/demo/")
    assert page.status_code == 200, page.text
    found = re.search(r"started on demand by Hestia in (\d+) ms", page.text)
    assert found, page.text
    assert 0 <= int(found.group(1)) < 120_000
    for leak in ("/services/demo/.git/HEAD", "/services/demo/hestia_config.yml", "/services/demo/hestia.db",
                 "/services/demo/../hestia_config.yml"):
        assert gw.http.get(leak).status_code == 404, leak
    # Listening on loopback only, as the shipped command says.
    assert demo["command"][-1] == "127.0.0.1"
    assert wait_for(lambda: gw.state("demo") == "ready", 5.0)


@pytest.mark.integration
def test_dev_sh_run_serves_the_shipped_config(tmp_path: Path) -> None:
    """The README's `./scripts/dev.sh run`, on a free port, with the shipped hestia_config.yml."""
    port, demo_port = free_port(), free_port()
    config = tmp_path / "hestia_config.yml"  # the shipped file, so that its hestia.db lands here
    config.write_text((REPO / "hestia_config.yml").read_text())
    env = {**os.environ, "HESTIA_CONFIG": str(config), "HESTIA_LISTEN": f"tcp:{port}:interface=127.0.0.1",
           "HESTIA_RUN_DIR": str(tmp_path / "run"),
           # The demo moved off its shipped port 8765 only, so that parallel runs do not collide.
           "DEMO_URL": f"http://127.0.0.1:{demo_port}",
           "DEMO_COMMAND": f"hestia-demo --port {demo_port} --bind 127.0.0.1"}
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([str(REPO / "scripts" / "dev.sh"), "run"], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return get_ok(f"{base}/v1/health") or proc.poll() is not None
            except httpx.HTTPError:
                return False

        assert wait_for(up, 60.0, 0.1) and proc.poll() is None, (tmp_path / "run.log").read_text()
        services = {s["name"]: s for s in httpx.get(f"{base}/v1/services", trust_env=False).json()["services"]}
        assert set(services) == {"ollama", "demo"}
        page = httpx.get(f"{base}/services/demo/", timeout=30, trust_env=False)
        assert page.status_code == 200 and "started on demand by Hestia" in page.text, page.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()


def get_ok(url: str) -> bool:
    return httpx.get(url, timeout=1, trust_env=False).status_code == 200
