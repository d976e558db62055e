"""The session fuzzer of the server (issue 9): a hypothesis state machine over real sockets.

- :mod:`tests.fuzz.world` serves a target device and a sentinel device in one trio loop;
- :mod:`tests.fuzz.machine` is the state machine (well-formed rules, mutations, findings);
- ``python -m tests.fuzz --seconds 600`` runs it for a long time with random seeds
  (:mod:`tests.fuzz.__main__`); ``tests/test_fuzz_sessions.py`` runs it briefly in CI.
"""
