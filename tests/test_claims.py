"""The create-if-absent protocol (`forgetray.claims`): its decision rule, and exactly-once publication under contention,
a dead writer taken over after its lease, a slow stale writer losing cleanly — on the in-memory store (pure, fast).
The same protocol on a real S3 server: tests/test_storage.py."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

from forgetray import claims
from forgetray.claims import Claim, MemoryStore, Seen, decide


def test_decide_uses_a_published_result_claims_a_free_key_waits_on_a_live_claim_takes_over_a_stale_one():
    assert decide(Seen("k.data.a", 3, 999.0), lease_s=10) == ("use", "k.data.a")
    assert decide(Seen(None, None, 0.0), lease_s=10) == ("claim", 0)
    assert decide(Seen(None, 0, 9.9), lease_s=10) == ("wait", None)
    assert decide(Seen(None, 0, 10.0), lease_s=10) == ("claim", 1)
    assert decide(Seen(None, 4, 11.0), lease_s=10) == ("claim", 5)


def test_watch_measures_how_long_a_heartbeat_stood_still_on_the_waiters_clock():
    now = [0.0]
    watch = claims.Watch(lambda: now[0])
    assert watch.unchanged_s((0, b"1")) == 0.0
    now[0] = 7.0
    assert watch.unchanged_s((0, b"1")) == 7.0
    assert watch.unchanged_s((0, b"2")) == 0.0  # it beat: alive
    now[0] = 9.0
    assert watch.unchanged_s((1, None)) == 0.0  # a new generation starts its own lease


class SlowStore(MemoryStore):
    """Listing takes a while (like a network store's), so that concurrent writers all look before any creates."""

    def keys(self, prefix: str):
        import time

        found = super().keys(prefix)
        time.sleep(0.05)  # the answer is on its way back while another writer may create
        return found


def _compete(store: MemoryStore, n: int, computed: list, **kwargs) -> list[str]:
    barrier = threading.Barrier(n)

    def one(i: int) -> str:
        barrier.wait()
        got = claims.acquire(store, "sweep/base_eval/x", poll_s=0.01, beat_s=0.01, **kwargs)
        if isinstance(got, str):
            return got
        computed.append(i)
        store.write(f"{got.data}/summary.json", json.dumps({"by": i}).encode())
        return claims.publish(store, got)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_eight_concurrent_trials_compute_a_shared_result_once_and_all_use_that_one():
    store, computed = SlowStore(), []
    results = _compete(store, 8, computed)
    assert len(computed) == 1 and len(set(results)) == 1
    assert json.loads(store.read(f"{results[0]}/summary.json")) == {"by": computed[0]}
    assert store.keys("sweep/base_eval/x.claim.") == ["sweep/base_eval/x.claim.0"]


def test_a_dead_writers_claim_is_taken_over_after_its_lease_and_not_before():
    store, now = MemoryStore(), [0.0]
    assert store.create("k.claim.0", b"{}")  # a writer that died right after claiming: it never beats
    store.write("k.beat.0", b"0")
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    got = claims.acquire(store, "k", lease_s=30, poll_s=5, clock=lambda: now[0], sleep=sleep, beat_s=0.01)
    assert isinstance(got, Claim) and got.generation == 1
    assert sum(slept) == 30  # waited out the lease exactly, on its own clock
    got.stop_beating()


def test_a_stale_writer_that_finishes_late_loses_to_the_first_publication_and_removes_its_upload():
    store = MemoryStore()
    slow = Claim("k", 0, "slow", "k.data.slow")
    fast = Claim("k", 1, "fast", "k.data.fast")
    store.write("k.data.slow/model.bin", b"slow")
    store.write("k.data.fast/model.bin", b"fast")
    assert claims.publish(store, fast) == "k.data.fast"
    assert claims.publish(store, slow) == "k.data.fast"
    assert store.keys("k.data.slow") == []
    assert claims.acquire(store, "k") == "k.data.fast"


def test_a_failed_writer_releases_its_upload_and_the_next_one_takes_over():
    store = MemoryStore()
    first = claims.acquire(store, "k", beat_s=0.01)
    store.write(f"{first.data}/half", b"x")
    claims.release(store, first)
    assert store.keys(first.data) == []
    second = claims.acquire(store, "k", lease_s=0.05, poll_s=0.01, beat_s=0.01)
    assert isinstance(second, Claim) and second.generation == 1
    second.stop_beating()
