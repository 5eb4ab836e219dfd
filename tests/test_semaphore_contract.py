"""
The Semaphore contract in the repository (tests/support/semaphore_contract.yml).

The double validates against that file, so a fresh clone needs nothing outside the
repository.  Where Semaphore's own api-docs.yml is at hand (beside the repository, as
on the developers' machines and in CI), one more test checks that the contract is still
what that file says; elsewhere that test does not exist (rather than skipping, which
CI counts as a failure).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.semaphore_contract import CONTRACT_PATH, NOTES, PATHS, extract, load, main, spec_part
from support.semaphore_double import DEFAULT_SPEC_PATH, SemaphoreDouble, load_spec

pytestmark = [pytest.mark.semaphore, pytest.mark.contract]

REPO = Path(__file__).resolve().parents[1]
# The only reader outside the repository, and optional (see the module docstring).
SEMAPHORE_API_DOCS = Path(os.environ.get("SEMAPHORE_API_DOCS") or REPO / "../shared/semaphore/api-docs.yml")


def test_the_double_reads_the_contract_inside_the_repository() -> None:
    assert DEFAULT_SPEC_PATH == CONTRACT_PATH
    assert CONTRACT_PATH.resolve().is_relative_to(REPO)
    spec = load_spec(str(CONTRACT_PATH))
    assert spec.base_path == "/api" and spec.version == load(CONTRACT_PATH)["info"]["version"]


def test_every_operation_the_double_models_is_in_the_contract(tmp_path: Path) -> None:
    double = SemaphoreDouble(token="t", state_dir=tmp_path, spec_path=CONTRACT_PATH)
    contract = load(CONTRACT_PATH)
    for method, path in double._handlers:
        assert path in contract["paths"], path
        assert method.lower() in contract["paths"][path], (method, path)
    assert set(contract["paths"]) == set(PATHS)


def test_every_reference_resolves_within_the_contract() -> None:
    contract = load(CONTRACT_PATH)
    assert spec_part(contract) == extract(contract)  # closed: extracting again loses nothing
    assert contract["x-hestia-notes"] == NOTES


if SEMAPHORE_API_DOCS.is_file():

    def test_the_contract_agrees_with_semaphores_own_api_docs() -> None:
        expected = extract(load(SEMAPHORE_API_DOCS))
        assert spec_part(load(CONTRACT_PATH)) == expected, (
            f"tests/support/semaphore_contract.yml differs from {SEMAPHORE_API_DOCS}: "
            f"run python tests/support/semaphore_contract.py {SEMAPHORE_API_DOCS} and review the diff"
        )


def test_the_regenerator_refuses_a_missing_file_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `python tests/support/semaphore_contract.py PATH` (DEV_ENVIRONMENT.md) with a wrong PATH or --help:
    # a usage or one line, no traceback, and the contract in the repository left as it is.
    before = CONTRACT_PATH.read_bytes()
    missing = tmp_path / "api-docs.yml"
    assert main(["semaphore_contract.py", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"semaphore_contract.py: cannot read {missing}: [Errno 2] No such file or directory: '{missing}'\n"
    )
    assert main(["semaphore_contract.py", "--help"]) == 2
    assert capsys.readouterr().err == "usage: semaphore_contract.py path/to/semaphore/api-docs.yml\n"
    assert CONTRACT_PATH.read_bytes() == before
