"""Helpers the tests share: real backends and gateways as processes, doubles, harnesses.

Nothing here is a test.  Tests import them as ``support.<module>``: setup.cfg's
``[tool:pytest] pythonpath = tests`` puts ``tests/`` on ``sys.path`` whatever pytest's import
mode, so the name is the same in every test file, in conftest.py and in these modules.
The modules that also run as scripts (backend.py, timed_backend.py, backlog_backend.py,
ws_backend.py, semaphore_contract.py) import only the standard library, third-party
packages and each other by file, so ``python tests/support/X.py`` works too; the
semaphore_double package runs as ``python tests/support/semaphore_double`` (its
``__main__`` puts ``tests/`` on ``sys.path``).
"""
