"""Create-if-absent: one writer computes a shared result (a trained start, the base-model probes) while the others
wait for it, on a store that has no file locks (object storage) — only an exclusive create of a small object.

Keys, for a shared result at key K (README "Checkpoints and storage"):

    K.claim.<n>     created exclusively by the writer of generation n: {"owner"}; the first create wins
    K.beat.<n>      that writer's heartbeat, rewritten every `beat_s` with a counter (only it writes this key)
    K.data.<owner>  what that writer uploads: never shared with another writer, so two writers cannot mix files
    K.done          created exclusively once the upload is complete: {"data": "K.data.<owner>"}; the first wins

A claim is stale when its heartbeat has not changed for `lease_s` as the waiter's own monotonic clock measures it
(no clock is compared across machines); the waiter then races for generation n + 1. A stale writer that was only
slow may still finish: its `done` create loses to the first one, and it deletes its own upload. The decision rule
(`decide`) is pure; `acquire` / `publish` run it against a `Store` (in memory here for the tests, S3 in
`forgetray.storage`).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol

LEASE_S = 120.0  # a claim whose heartbeat stood still this long is taken over
BEAT_S = 10.0
POLL_S = 2.0


class Store(Protocol):
    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; True if this call created it (atomically: one winner)."""

    def read(self, key: str) -> bytes | None: ...

    def write(self, key: str, data: bytes) -> None: ...

    def keys(self, prefix: str) -> list[str]: ...

    def delete_tree(self, key: str) -> None: ...


@dataclass(frozen=True)
class Seen:
    """What a participant read from the store in one poll."""

    done: str | None  # the published data key, if any
    generation: int | None  # the newest claim's generation, if any
    unchanged_s: float  # how long (this participant's clock) that claim's heartbeat has not changed


def decide(seen: Seen, lease_s: float) -> tuple[str, object]:
    """("use", data key) | ("claim", generation) | ("wait", None)."""
    if seen.done is not None:
        return "use", seen.done
    if seen.generation is None:
        return "claim", 0
    if seen.unchanged_s >= lease_s:  # its writer stopped beating: dead, or cut off from the store that long
        return "claim", seen.generation + 1
    return "wait", None


class Watch:
    """Measures how long a claim's heartbeat has stood still, on this participant's monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock, self.last, self.since = clock, None, clock()

    def unchanged_s(self, beat: tuple) -> float:
        if beat != self.last:
            self.last, self.since = beat, self.clock()
        return self.clock() - self.since


@dataclass
class Claim:
    """A won claim: upload to `data`, then `publish` (or `release` on failure)."""

    key: str
    generation: int
    owner: str
    data: str
    _stop: threading.Event | None = None

    def stop_beating(self) -> None:
        if self._stop is not None:
            self._stop.set()


def _generations(store: Store, key: str) -> list[int]:
    prefix = f"{key}.claim."
    return sorted(int(k[len(prefix):]) for k in store.keys(prefix) if k[len(prefix):].isdigit())


def look(store: Store, key: str, watch: Watch) -> Seen:
    done = store.read(f"{key}.done")
    if done is not None:
        return Seen(json.loads(done)["data"], None, 0.0)
    generations = _generations(store, key)
    if not generations:
        return Seen(None, None, 0.0)
    n = generations[-1]
    return Seen(None, n, watch.unchanged_s((n, store.read(f"{key}.beat.{n}"))))


def acquire(store: Store, key: str, lease_s: float = LEASE_S, poll_s: float = POLL_S, beat_s: float = BEAT_S,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
            timeout_s: float | None = None) -> str | Claim:
    """The published data key of `key` (waiting while another writer holds a live claim), or a `Claim` this caller
    won (its heartbeat thread runs until `publish` / `release`)."""
    watch, start = Watch(clock), clock()
    while True:
        action, value = decide(look(store, key, watch), lease_s)
        if action == "use":
            return value
        if action == "claim":
            owner = uuid.uuid4().hex[:12]
            if store.create(f"{key}.claim.{value}", json.dumps({"owner": owner}).encode()):
                claim = Claim(key, value, owner, f"{key}.data.{owner}")
                claim._stop = _beat(store, f"{key}.beat.{value}", beat_s)
                return claim
            continue  # lost the race: look again at once
        if timeout_s is not None and clock() - start > timeout_s:
            raise TimeoutError(f"{key}: waited {timeout_s:.0f} s for the writer of claim {look(store, key, watch)}")
        sleep(poll_s)


def _beat(store: Store, key: str, every_s: float) -> threading.Event:
    stop = threading.Event()

    def run() -> None:
        count = 0
        while True:
            try:
                store.write(key, str(count).encode())
            except Exception:  # noqa: BLE001 (the store is down: the next beat tries again; a long outage is stale)
                pass
            count += 1
            if stop.wait(every_s):
                return

    threading.Thread(target=run, name=f"beat {key}", daemon=True).start()
    return stop


def publish(store: Store, claim: Claim) -> str:
    """Make the claim's complete upload the result; returns the data key that won (another writer's if a stale
    claim was taken over and finished first, in which case this upload is deleted)."""
    claim.stop_beating()
    if store.create(f"{claim.key}.done", json.dumps({"data": claim.data}).encode()):
        return claim.data
    store.delete_tree(claim.data)
    return json.loads(store.read(f"{claim.key}.done"))["data"]


def release(store: Store, claim: Claim) -> None:
    """A writer that failed: stop beating (its claim goes stale after the lease and another writer takes over)
    and remove its partial upload."""
    claim.stop_beating()
    store.delete_tree(claim.data)


class MemoryStore:
    """A `Store` in memory (thread-safe): the unit tests' store, and the rule's reference semantics."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def create(self, key: str, data: bytes) -> bool:
        with self.lock:
            if key in self.objects:
                return False
            self.objects[key] = data
            return True

    def read(self, key: str) -> bytes | None:
        with self.lock:
            return self.objects.get(key)

    def write(self, key: str, data: bytes) -> None:
        with self.lock:
            self.objects[key] = data

    def keys(self, prefix: str) -> list[str]:
        with self.lock:
            return sorted(k for k in self.objects if k.startswith(prefix))

    def delete_tree(self, key: str) -> None:
        with self.lock:
            for k in [k for k in self.objects if k == key or k.startswith(key + "/")]:
                del self.objects[k]
