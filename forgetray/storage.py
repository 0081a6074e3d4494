"""Where a sweep keeps its files: a local (or shared) folder, as ever, or object storage (`--storage s3://bucket/pfx`).

A location is a `Path` / plain path (local) or an `s3://bucket/key` string (remote); the helpers here take either.
On S3:
- Ray Tune and Ray Train write their experiment state and checkpoints through `filesystem()` (pyarrow's S3
  filesystem, given as `storage_filesystem`), whose calls the AWS SDK retries with exponential backoff and no
  retry quota (`FORGETRAY_STORAGE_ATTEMPTS`, default 13: 205 s without an answer before a call fails); forgetray's
  own calls are retried as long (`FORGETRAY_STORAGE_RETRY_S`, default 240 s);
- results shared across trials (a trained start, the base-model probes) are published with the create-if-absent
  protocol of `forgetray.claims` (S3's conditional PUT, `If-None-Match: *`) instead of file locks;
- a folder written by forgetray is complete when its `.complete` object exists (written last); an object is visible
  only once its PUT finished, so nothing is seen half-written;
- what a node reads (a start to load, probes to log) is downloaded into its cache, `FORGETRAY_STORAGE_CACHE`
  (default ~/.cache/forgetray/storage): nothing else is written on a node's disk but temporary folders.
The endpoint and credentials come from the environment every node sees (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

from forgetray import claims
from forgetray.spec import SpecError

SCHEME = "s3://"
COMPLETE = ".complete"  # written last into a folder forgetray uploads: the folder is whole
RETRY_ENV = "FORGETRAY_STORAGE_RETRY_S"  # how long one of forgetray's calls is retried while the store is silent
RETRY_S = 240.0
# pyarrow's S3 calls (Ray Tune and Ray Train's): the AWS SDK's "default" (legacy) strategy, waiting 25 ms x 2^k
# before retry k = 1 .. attempts-1: 25 ms x (2^attempts - 2) in all (6 attempts 1.55 s, 8 attempts 6.35 s, measured
# against a closed port; 13: 205 s). Not the "standard" strategy: its retry quota (500 tokens, 5-10 per retry) is
# shared by the filesystem's calls, and 30 calls at once against a silent store all failed within 10 s instead of
# retrying for minutes (measured; tests/test_object_storage.py): a 60 s outage failed trials under load.
ATTEMPTS_ENV = "FORGETRAY_STORAGE_ATTEMPTS"
ATTEMPTS = 13
CACHE_ENV = "FORGETRAY_STORAGE_CACHE"


def is_remote(location) -> bool:
    return str(location).startswith(SCHEME)


def join(location, *parts):
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return Path(location, *parts)


def name(location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location):
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_remote(location) else Path(location).parent


def key(location) -> str:
    """`bucket/key` of an s3:// location (pyarrow's and the claims' name for it)."""
    return str(location)[len(SCHEME):].rstrip("/")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "forgetray" / "storage")


def local_path(location) -> Path:
    """Where a location's files are on this node: itself (local), or its place in the node's cache (remote)."""
    return cache_root() / key(location) if is_remote(location) else Path(location)


def validate(uri: str) -> str:
    """Check `--storage s3://bucket/prefix` before anything runs: the bucket named, the endpoint answering, the
    bucket there. Returns the URI without a trailing slash."""
    if not is_remote(uri):
        raise SpecError(f"--storage {uri!r}: object storage must be s3://bucket/prefix (other schemes have no "
                        "create-if-absent forgetray can use)")
    bucket = key(uri).split("/", 1)[0]
    if not bucket:
        raise SpecError(f"--storage {uri!r}: no bucket (write s3://BUCKET/prefix)")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default"
    import botocore.exceptions

    try:
        _client(quick=True).head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        what = "does not exist" if code in ("404", "NoSuchBucket") else f"refused access ({code})"
        raise SpecError(f"--storage {uri!r}: bucket {bucket!r} {what} at {endpoint}") from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise SpecError(f"--storage {uri!r}: the endpoint {endpoint} (AWS_ENDPOINT_URL) did not answer: "
                        f"{type(exc).__name__}: {exc}") from None
    return uri.rstrip("/")


def _retry_s() -> float:
    return float(os.environ.get(RETRY_ENV, RETRY_S))


def retrying(call, what: str):
    """`call()`, retried (1 s doubling to 10 s) while the store does not answer, up to `_retry_s()`. A missing
    object is an answer (FileNotFoundError is raised at once)."""
    import botocore.exceptions

    deadline, delay = time.monotonic() + _retry_s(), 1.0
    while True:
        try:
            return call()
        except FileNotFoundError:
            raise
        except (OSError, botocore.exceptions.BotoCoreError) as exc:
            if isinstance(exc, botocore.exceptions.ClientError) and \
                    exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500) < 500:
                raise  # the store answered: not an outage
            if time.monotonic() + delay > deadline:
                raise OSError(f"storage: {what} failed for {_retry_s():.0f} s ({RETRY_ENV}): {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


@functools.lru_cache(maxsize=2)
def _client(quick: bool = False):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30,
                    retries={"max_attempts": 1 if quick else 3, "mode": "standard"})
    return boto3.client("s3", config=config)


@functools.lru_cache(maxsize=1)
def filesystem():
    """The pyarrow filesystem of s3:// locations (Ray's `storage_filesystem`; it crosses Ray pickled)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {"connect_timeout": 5, "request_timeout": 30}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host, scheme=scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return retrying_s3(options, int(os.environ.get(ATTEMPTS_ENV, ATTEMPTS)))


def retrying_s3(options: dict, attempts: int):
    """pyarrow's S3 filesystem with `attempts` of the legacy retry strategy, in this process and in every process
    it is pickled to: pyarrow's own pickling drops the retry strategy (an unpickled copy, what Ray Train's
    controllers and workers write checkpoints through, gave up after 2 s against a silent store, measured), so
    this one pickles as `retrying_s3(options, attempts)`."""
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        def __reduce__(self):
            return retrying_s3, (options, attempts)

    return RetryingS3FileSystem(**options, retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts))


def ray_storage(location) -> tuple[str, object]:
    """(storage_path, storage_filesystem) for Ray Tune / Ray Train's RunConfig."""
    return (key(location), filesystem()) if is_remote(location) else (str(location), None)


def exists(location) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    import pyarrow.fs as pafs

    info = retrying(lambda: filesystem().get_file_info(key(location)), f"look up {location}")
    return info.type != pafs.FileType.NotFound


def read_text(location) -> str | None:
    """The text of a file, None if it is absent."""
    if not is_remote(location):
        path = Path(location)
        return path.read_text() if path.is_file() else None
    body = S3Objects().read(key(location))
    return None if body is None else body.decode()


def write_text(location, text: str) -> None:
    """Write a small file whole: one PUT on S3 (an object is visible only once complete)."""
    if is_remote(location):
        S3Objects().write(key(location), text.encode())
    else:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        Path(location).write_text(text)


def children(location) -> list[str]:
    """The names directly under a folder (sorted; none if it is absent)."""
    if not is_remote(location):
        return sorted(p.name for p in Path(location).iterdir()) if Path(location).is_dir() else []
    import pyarrow.fs as pafs

    found = retrying(lambda: filesystem().get_file_info(pafs.FileSelector(key(location), allow_not_found=True)),
                     f"list {location}")
    return sorted(Path(info.path).name for info in found)


def delete_tree(location) -> None:
    if is_remote(location):
        S3Objects().delete_tree(key(location))
    else:
        shutil.rmtree(location, ignore_errors=True)


def put_dir(local: Path, location) -> None:
    """Upload a local folder to `location`, then `.complete`: readers take it only once that exists."""
    import pyarrow.fs as pafs

    delete_tree(location)  # what an interrupted upload of it left
    fs = filesystem()
    for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        target = f"{key(location)}/{path.relative_to(local).as_posix()}"
        retrying(lambda: pafs.copy_files(str(path), target, source_filesystem=pafs.LocalFileSystem(),
                                         destination_filesystem=fs), f"upload {target}")
    write_text(join(location, COMPLETE), "")


def complete(location) -> bool:
    return exists(join(location, COMPLETE)) if is_remote(location) else Path(location).is_dir()


def published(location) -> str | Path | None:
    """Where a shared result (`forgetray.claims`) is: its data folder (remote) / itself (local), None if not yet."""
    if not is_remote(location):
        return Path(location) if Path(location).is_dir() else None
    done = S3Objects().read(f"{key(location)}.done")
    return None if done is None else SCHEME + __import__("json").loads(done)["data"]


def fetch(location) -> Path:
    """A folder's files on this node: itself (local), else downloaded once into the cache (a shared result by its
    published data folder). Raises FileNotFoundError if it is not (completely) on storage."""
    if not is_remote(location):
        return Path(location)
    source = published(location) or location
    if not complete(source):
        raise FileNotFoundError(f"{location}: not on storage (or not completely)")
    target = local_path(source)
    if target.is_dir():
        return target
    import pyarrow.fs as pafs

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    retrying(lambda: pafs.copy_files(key(source), str(tmp), source_filesystem=filesystem(),
                                     destination_filesystem=pafs.LocalFileSystem()), f"download {source}")
    (tmp / COMPLETE).unlink(missing_ok=True)  # storage's marker, not part of the folder
    try:
        tmp.rename(target)  # complete or absent in the cache too
    except OSError:  # another process of this node got it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class S3Objects:
    """`claims.Store` on S3 through boto3: `create` is a conditional PUT (`If-None-Match: *`, answered 412 if the
    key exists), the one primitive pyarrow does not offer. Keys are `bucket/key`."""

    def create(self, key: str, data: bytes) -> bool:
        import botocore.exceptions

        bucket, name = key.split("/", 1)
        try:
            retrying(lambda: _client().put_object(Bucket=bucket, Key=name, Body=data, IfNoneMatch="*"),
                     f"create {key}")
            return True
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False  # 412: it exists; 409: a concurrent conditional PUT of it is under way
            raise

    def read(self, key: str) -> bytes | None:
        import botocore.exceptions

        bucket, name = key.split("/", 1)
        try:
            return retrying(lambda: _client().get_object(Bucket=bucket, Key=name)["Body"].read(), f"read {key}")
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    def write(self, key: str, data: bytes) -> None:
        bucket, name = key.split("/", 1)
        retrying(lambda: _client().put_object(Bucket=bucket, Key=name, Body=data), f"write {key}")

    def keys(self, prefix: str) -> list[str]:
        bucket, name = prefix.split("/", 1)
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=name)
        found = retrying(lambda: [o["Key"] for page in pages for o in page.get("Contents", [])], f"list {prefix}")
        return sorted(f"{bucket}/{k}" for k in found)

    def delete_tree(self, key: str) -> None:
        bucket = key.split("/", 1)[0]
        for found in [k for k in self.keys(key) if k == key or k.startswith(key + "/")]:
            retrying(lambda k=found: _client().delete_object(Bucket=bucket, Key=k.split("/", 1)[1]),
                     f"delete {found}")


def acquire(location, **kwargs):
    """`claims.acquire` of a shared result at an s3:// location."""
    return claims.acquire(S3Objects(), key(location), **kwargs)
