"""A hypothesis state machine over open / commit / transaction / failing transaction / reopen / external commit
(from another process), checked against a model of what the file must hold."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import lockstore

from ._harness import add, child_cmd, child_env

values = st.fixed_dictionaries({"n": st.integers(-10**6, 10**6), "tag": st.text(max_size=12)})
DEFAULT = {"n": 0, "tag": ""}


class Boom(Exception):
    pass


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="lockstore-sm-"))
        self.path = self.dir / "store.json"
        self.disk: dict[str, Any] | None = None  # the model: what the file holds (None: no file)
        self.store: lockstore.Store[Any] | None = None
        self.server: subprocess.Popen[str] | None = None

    def teardown(self) -> None:
        if self.server is not None:
            assert self.server.stdin is not None
            self.server.stdin.close()
            self.server.wait(30)
            assert self.server.stdout is not None
            self.server.stdout.close()
        if self.store is not None:
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def expected(self) -> dict[str, Any]:
        return dict(DEFAULT) if self.disk is None else self.disk

    @initialize()
    def open_store(self) -> None:
        self.store = lockstore.open(self.path, default=dict(DEFAULT))
        assert self.store.value == self.expected()

    @rule(value=values)
    def commit(self, value: dict[str, Any]) -> None:
        assert self.store is not None
        self.store.value = dict(value)
        self.store.commit()
        self.disk = dict(value)

    @rule(delta=st.integers(-100, 100), tag=st.text(max_size=5))
    def transaction(self, delta: int, tag: str) -> None:
        assert self.store is not None
        with self.store.transaction() as s:
            assert s.value == self.expected(), "the transaction did not reload what is on disk"
            s.value["n"] += delta
            s.value["tag"] = tag
        if not (self.disk is None and delta == 0 and tag == ""):
            self.disk = {"n": self.expected()["n"] + delta, "tag": tag}

    @rule(delta=st.integers(1, 100))
    def failing_transaction(self, delta: int) -> None:
        assert self.store is not None
        with pytest.raises(Boom), self.store.transaction() as s:
            s.value["n"] += delta
            raise Boom
        assert self.store.value == self.expected(), "a failed transaction left its change in memory"

    @rule()
    def reopen(self) -> None:
        if self.store is not None:
            self.store.close()
        self.store = lockstore.open(self.path, default=dict(DEFAULT))
        assert self.store.value == self.expected()

    @rule(value=values)
    def external_commit(self, value: dict[str, Any]) -> None:
        if self.server is None:
            self.server = subprocess.Popen(child_cmd("server", str(self.path)), stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, env=child_env())
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps(value) + "\n")
        self.server.stdin.flush()
        assert self.server.stdout.readline().strip() == "ok"
        self.disk = dict(value)

    @precondition(lambda self: self.store is not None)
    @rule()
    def reload(self) -> None:
        assert self.store is not None
        assert self.store.reload() == self.expected()

    @invariant()
    def file_matches_model(self) -> None:
        add("transactions checked")
        if self.disk is None:
            assert not self.path.exists()
        else:
            assert lockstore.read(self.path) == self.disk


StoreMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=12, deadline=None, database=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestStoreMachine = pytest.mark.timeout(120)(StoreMachine.TestCase)
