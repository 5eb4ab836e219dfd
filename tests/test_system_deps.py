"""
scripts/install-system-deps.sh: installs what is missing and never upgrades.

apt cannot be exercised for real without changing the machine, so C{dpkg-query},
C{apt-get} and C{sudo} are small scripts first on C{PATH}: the installed set and
apt's simulated plan are what a test says, and every apt-get call is recorded.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-system-deps.sh"


def fake_tools(tmp_path: Path, missing: set[str], plan: str) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    (bin_dir / "dpkg-query").write_text(
        "#!/bin/sh\n"
        'for package; do :; done\n'  # the last argument
        f'case " {" ".join(sorted(missing))} " in *" $package "*) exit 1;; esac\n'
        "printf 'install ok installed'\n"
    )
    (tmp_path / "plan").write_text(plan)
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'for arg in "$@"; do [ "$arg" = -s ] && exec cat ' f"{tmp_path / 'plan'}; done\n"
        "exit 0\n"
    )
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    return env, calls


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=30,
                          stdin=subprocess.DEVNULL, check=False)


def test_nothing_missing_means_no_apt_at_all(tmp_path: Path) -> None:
    env, calls = fake_tools(tmp_path, set(), "")
    result = run(env)
    assert (result.returncode, result.stderr) == (0, "")
    assert not calls.exists()


def test_installs_only_the_missing_packages_and_says_why(tmp_path: Path) -> None:
    plan = ("Inst mmdebstrap (1.3.5-7 Debian:12.15/oldstable [all])\n"
            "Inst libfoo1 (1.0-1 Debian:12.15/oldstable [amd64])\n"
            "Inst docker-compose (1.29.2-3 Debian:12.15/oldstable [all])\n")
    env, calls = fake_tools(tmp_path, {"mmdebstrap", "docker-compose"}, plan)
    result = run(env)
    assert result.returncode == 0, result.stderr
    assert "docker-compose: runs docker-compose.yml" in result.stderr
    assert "mmdebstrap: builds the Dockerfile's base image" in result.stderr
    assert "and their dependencies: libfoo1" in result.stderr
    update, simulate, install = calls.read_text().splitlines()
    assert update == "update -q"
    assert simulate == "install -y -q --no-install-recommends --no-upgrade -s docker-compose mmdebstrap"
    assert install == "install -y -q --no-install-recommends --no-upgrade docker-compose mmdebstrap"


def test_refuses_a_plan_that_upgrades_what_the_user_has(tmp_path: Path) -> None:
    plan = ("Inst libc6 [2.36-9+deb12u7] (2.36-9+deb12u10 Debian-Security:12/oldstable-security [amd64])\n"
            "Inst systemd [252.30-1~deb12u2] (252.38-1~deb12u1 Debian:12.15/oldstable [amd64])\n"
            "Remv oldthing [1.0]\n"
            "Inst chromium (140.0 Debian-Security:12/oldstable-security [amd64])\n")
    env, calls = fake_tools(tmp_path, {"chromium"}, plan)
    result = run(env)
    assert result.returncode == 1
    assert "upgrade libc6 from 2.36-9+deb12u7" in result.stderr
    assert "upgrade systemd from 252.30-1~deb12u2" in result.stderr
    assert "remove oldthing" in result.stderr
    assert "nothing installed" in result.stderr
    assert [line for line in calls.read_text().splitlines() if "-s" not in line.split()] == ["update -q"]

    env["HESTIA_APT_ALLOW_UPGRADES"] = "1"
    assert run(env).returncode == 0
    assert calls.read_text().splitlines()[-1] == "install -y -q --no-install-recommends --no-upgrade chromium"
