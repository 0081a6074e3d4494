"""forgetray.tracking.retrying tells a transient tracking error by its class (or that of an exception behind it) and
MLflow's error code, never by its message: on exceptions built by hand, and on the real ones MLflow raises for a
server nobody listens on and for a locked sqlite store. The retry bound and a whole store outage are in
tests/test_faults.py; the dataset-insert race there too (on sqlite and through a server), its bounded retry of
BAD_REQUEST here."""

from __future__ import annotations

import socket
import sqlite3

import pytest
import requests
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, DEADLINE_EXCEEDED, RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from forgetray import tracking
from forgetray.tracking import _transient, retrying


def _raised_while_handling(inner: BaseException, outer: BaseException) -> BaseException:
    """`outer` as MLflow's HTTP client raises it: inside the `except` of `inner` (so inner is its __context__)."""
    try:
        try:
            raise inner
        except type(inner):
            raise outer  # noqa: B904 (the implicit chaining is the point)
    except type(outer) as exc:
        return exc


def test_transient_by_class_and_error_code_not_by_message():
    assert _transient(MlflowException("x", error_code=TEMPORARILY_UNAVAILABLE))
    assert _transient(MlflowException("x", error_code=DEADLINE_EXCEEDED))
    assert _transient(sqlalchemy.exc.OperationalError("UPDATE runs", {}, sqlite3.OperationalError("locked")))
    assert _transient(ConnectionRefusedError())
    assert _transient(_raised_while_handling(requests.exceptions.ConnectionError("refused"),
                                             MlflowException("API request failed")))
    assert _transient(_raised_while_handling(requests.exceptions.RetryError("too many 503"),
                                             MlflowException("API request failed")))
    # A client error says nothing transient, whatever words its message has (the old substring rule retried these).
    assert not _transient(MlflowException("connection timed out: 503 database is locked",
                                          error_code=RESOURCE_DOES_NOT_EXIST))
    assert not _transient(ValueError("Connection refused"))
    race = sqlalchemy.exc.IntegrityError("INSERT INTO datasets", {}, sqlite3.IntegrityError("UNIQUE constraint"))
    assert not _transient(race)  # the dataset race's IntegrityError: retried by Tracker.log_datasets alone


def test_retrying_retries_transient_errors_and_raises_the_others_at_once(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    def flaky(value):
        calls.append(value)
        if len(calls) < 3:
            raise MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE)
        return value

    assert retrying(flaky, 7, bound_s=60) == 7 and calls == [7, 7, 7]

    def missing():
        calls.append("missing")
        raise MlflowException("Run 'x' not found", error_code=RESOURCE_DOES_NOT_EXIST)

    calls.clear()
    with pytest.raises(MlflowException, match="not found"):
        retrying(missing, bound_s=60)
    assert calls == ["missing"]


def test_the_real_errors_of_a_server_nobody_listens_on_and_of_a_locked_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Exception) as refused:
        tracking.Tracker(f"http://127.0.0.1:{port}").client.set_tag("0" * 32, "k", "v")
    assert _transient(refused.value), repr(refused.value)

    # sqlite locked by another writer, through MLflow's own session handling (its SQL stores' every call): MLflow
    # waits 20 s on a lock (busy_timeout), which this test lowers to 0 inside the session.
    from mlflow.store.db.utils import _get_managed_session_maker
    from sqlalchemy.orm import sessionmaker

    db = tmp_path / "locked.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
    managed = _get_managed_session_maker(sessionmaker(bind=engine), "sqlite")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write
    try:
        with pytest.raises(MlflowException) as locked:
            with managed(read_only=False) as session:
                session.execute(sqlalchemy.text("PRAGMA busy_timeout = 0"))
                session.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()
    assert "database is locked" in str(locked.value)
    assert _transient(locked.value), repr(locked.value)


def test_a_dataset_logging_retries_bad_request_a_bounded_number_of_times_only(monkeypatch):
    """The race's loser gets BAD_REQUEST (all a server sends of the IntegrityError): retried, but a request that stays
    bad fails after tracking.DATASET_ATTEMPTS tries, and any other client error at once."""
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls = []

    class Client:
        def __init__(self, errors):
            self.errors = list(errors)

        def log_inputs(self, run_id, datasets):
            calls.append(run_id)
            if self.errors:
                raise self.errors.pop(0)

    tracker = object.__new__(tracking.Tracker)
    dataset = [{"name": "alpaca", "source": "/a.jsonl", "digest": "d", "context": "training", "source_type": "local"}]
    lost = MlflowException("UNIQUE constraint failed: datasets", error_code=BAD_REQUEST)
    tracker.client = Client([lost])
    tracker.log_datasets("won-second", dataset)
    assert calls == ["won-second"] * 2
    calls.clear()
    tracker.client = Client([lost] * 10)
    with pytest.raises(MlflowException, match="UNIQUE"):
        tracker.log_datasets("always-bad", dataset)
    assert calls == ["always-bad"] * tracking.DATASET_ATTEMPTS == ["always-bad"] * 4
    calls.clear()
    tracker.client = Client([MlflowException("Run 'x' not found", error_code=RESOURCE_DOES_NOT_EXIST)])
    with pytest.raises(MlflowException, match="not found"):
        tracker.log_datasets("missing", dataset)
    assert calls == ["missing"]
