"""Objects in S3-compatible storage (AWS S3, MinIO, Ceph, R2, ...): `s3://bucket/prefix` URIs, a boto3
client configured the standard AWS way, bounded retries, and errors that name endpoint, bucket and key.

Endpoint, region and credentials come from where every AWS tool looks (boto3's own resolution):
AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 or `endpoint_url` in ~/.aws/config (MinIO, Ceph, R2), AWS_REGION /
AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials, SSO, the
instance role. hvpmtl never takes a credential as an argument or config key, so none reaches a config
file, an MLflow parameter or a checkpoint; messages show the endpoint without user info and scrub the
key values of the environment.

Retries: botocore's "standard" mode (throttling, 5xx, connection errors) up to `attempts` tries per
request, plus the same bound around reading a body (a connection dropped mid-download); then a
DataError, never a hang (connect and read timeouts are bounded too).
"""
from __future__ import annotations

import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit, urlunsplit

from hvpmtl.data.formats.issues import DataError

SCHEME = "s3://"
ATTEMPTS = 5
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
CHUNK = 8 << 20
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
              "TokenRefreshRequired", "InvalidClientTokenId", "AuthorizationHeaderMalformed", "403", "Forbidden"}
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")  # loose: S3-compatible stores allow more than AWS


def is_s3(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


@dataclass(frozen=True)
class S3Uri:
    """s3://bucket/key. For a folder-like prefix the key has no trailing slash ('' = the bucket root)."""
    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not is_s3(uri):
            raise DataError(f"'{uri}' is not an s3:// URI (expected s3://bucket/prefix)")
        bucket, _, key = uri[len(SCHEME):].partition("/")
        if not BUCKET_RE.match(bucket):
            raise DataError(f"'{uri}': '{bucket}' is not a bucket name (expected s3://bucket/prefix)")
        return cls(bucket, key.strip("/"))

    def child(self, name: str) -> "S3Uri":
        return S3Uri(self.bucket, f"{self.key}/{name}" if self.key else name)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"


def shown_endpoint(url: Optional[str]) -> str:
    """The endpoint as it may be printed: no user:password@, no query."""
    if not url:
        return "AWS S3 (default endpoint)"
    u = urlsplit(url)
    host = u.hostname or ""
    netloc = f"{host}:{u.port}" if u.port else host
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


def scrub(text: str) -> str:
    """Remove the values of the credential variables from a message (a server may echo them)."""
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        v = os.environ.get(k)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    return text


@dataclass
class ObjectInfo:
    size: int
    mtime_ns: int  # the object's Last-Modified (whole seconds)
    etag: str


class ObjectStore:
    """One bucket through boto3. Thread-safe (boto3 clients are); made per process."""

    def __init__(self, bucket: str, *, attempts: Optional[int] = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                 read_timeout: float = READ_TIMEOUT_S):
        import boto3
        from botocore.config import Config
        if attempts is None:  # the standard variable (DALI's S3 client, the AWS C++ SDK, reads it too)
            attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or ATTEMPTS)
        self.bucket, self.attempts = bucket, max(1, attempts)
        cfg = Config(retries={"total_max_attempts": self.attempts, "mode": "standard"},
                     connect_timeout=connect_timeout, read_timeout=read_timeout, max_pool_connections=32)
        self.client = boto3.session.Session().client("s3", config=cfg)
        self.endpoint = self.client.meta.endpoint_url
        self.where = f"bucket '{bucket}' at {shown_endpoint(self.endpoint)}"

    @classmethod
    def for_uri(cls, uri: str | S3Uri, **kw) -> tuple["ObjectStore", S3Uri]:
        u = uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)
        return cls(u.bucket, **kw), u

    # -- errors ---------------------------------------------------------------------------

    def explain(self, e: BaseException, what: str) -> DataError:
        """A DataError for a failed request about `what` (a key or URI); never echoes a credential."""
        from botocore import exceptions as bx
        if isinstance(e, DataError):
            return e
        if isinstance(e, bx.NoCredentialsError):
            return DataError(f"{what}: no AWS credentials found for {self.where}: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / ~/.aws/credentials")
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError,
                          bx.ReadTimeoutError, bx.ResponseStreamingError, ConnectionError, socket.timeout)):
            return DataError(f"{what}: cannot reach {self.where} after {self.attempts} attempts "
                             f"({type(e).__name__}); check AWS_ENDPOINT_URL / endpoint_url in ~/.aws/config "
                             "and the network")
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in AUTH_CODES or status == 403:
                return DataError(f"{what}: credentials refused by {self.where} ({code or status}); check "
                                 "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE")
            if code == "NoSuchBucket":
                return DataError(f"{what}: {self.where} does not exist")
            if code in ("NoSuchKey", "404", "NotFound"):
                return DataError(f"{what}: not found in {self.where}")
            return DataError(f"{what}: {self.where} answered {code or status}: "
                             f"{scrub(str(err.get('Message', '')))[:300]}")
        if isinstance(e, bx.BotoCoreError):
            return DataError(f"{what}: request to {self.where} failed: {scrub(str(e))[:300]}")
        return DataError(f"{what}: request to {self.where} failed: {type(e).__name__}: {scrub(str(e))[:300]}")

    def _call(self, what: str, fn: Callable, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # every failure becomes a DataError naming endpoint and bucket
            raise self.explain(e, what) from None

    @staticmethod
    def is_missing(e: DataError) -> bool:
        return "not found in bucket" in str(e)

    # -- requests -------------------------------------------------------------------------

    def check(self, key: str = "") -> None:
        """Reachable, credentials accepted and the bucket there (HEAD bucket): a DataError otherwise."""
        self._call(f"s3://{self.bucket}/{key}", self.client.head_bucket, Bucket=self.bucket)

    def head(self, key: str) -> Optional[ObjectInfo]:
        """The object's size and Last-Modified, or None when it does not exist."""
        try:
            r = self._call(f"s3://{self.bucket}/{key}", self.client.head_object, Bucket=self.bucket, Key=key)
        except DataError as e:
            if self.is_missing(e):
                return None
            raise
        return ObjectInfo(int(r["ContentLength"]), int(r["LastModified"].timestamp()) * 10**9,
                          str(r.get("ETag", "")).strip('"'))

    def list(self, prefix: str) -> dict[str, ObjectInfo]:
        """Objects under `prefix` (a folder: no trailing slash) by name relative to it, not recursing."""
        p = f"{prefix}/" if prefix else ""
        out: dict[str, ObjectInfo] = {}

        def run():
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=p,
                                                                                Delimiter="/"):
                for o in page.get("Contents", []):
                    out[o["Key"][len(p):]] = ObjectInfo(int(o["Size"]), int(o["LastModified"].timestamp()) * 10**9,
                                                        str(o.get("ETag", "")).strip('"'))
        self._call(f"s3://{self.bucket}/{p}", run)
        return out

    def get_bytes(self, key: str) -> bytes:
        return self._read(key, lambda body, sink: sink.append(body.read()), list, lambda parts: b"".join(parts))

    def download(self, key: str, dest: str | Path, expect_size: Optional[int] = None) -> int:
        """Copy the object to `dest` (written aside, then renamed: a killed download leaves no partial
        `dest`); returns its size. A body shorter than its Content-Length is retried, then an error."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part-{socket.gethostname()}-{os.getpid()}")

        def into(body, f):
            while chunk := body.read(CHUNK):
                f.write(chunk)
        try:
            n = self._read(key, into, lambda: open(tmp, "wb"), lambda f: (f.close(), tmp.stat().st_size)[1])
            if expect_size is not None and n != expect_size:
                raise DataError(f"s3://{self.bucket}/{key}: {n} bytes in {self.where}, expected {expect_size} "
                                "(truncated or replaced)")
            os.replace(tmp, dest)
            return n
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, key: str, consume, open_sink, close_sink):
        """GET with bounded retries around the body too (botocore retries the request, not the stream)."""
        from botocore import exceptions as bx
        what = f"s3://{self.bucket}/{key}"
        for attempt in range(1, self.attempts + 1):
            sink = open_sink()
            try:
                r = self.client.get_object(Bucket=self.bucket, Key=key)
                body = r["Body"]
                consume(body, sink)
                got = close_sink(sink)
                length = int(r.get("ContentLength", -1))
                size = got if isinstance(got, int) else len(got)
                if length >= 0 and size != length:
                    raise bx.ResponseStreamingError(error=f"{size} of {length} bytes")
                return got
            except (bx.ResponseStreamingError, bx.ReadTimeoutError, bx.ConnectionClosedError,
                    bx.EndpointConnectionError, ConnectionError, socket.timeout) as e:
                if hasattr(sink, "close"):
                    sink.close()
                if attempt == self.attempts:
                    raise self.explain(e, what) from None
                time.sleep(min(2.0, 0.1 * 2 ** attempt))
            except Exception as e:
                if hasattr(sink, "close"):
                    sink.close()
                raise self.explain(e, what) from None

    def upload(self, path: str | Path, key: str) -> None:
        """Upload a file (multipart above 8 MiB through s3transfer; a failed upload leaves no object)."""
        self._call(f"s3://{self.bucket}/{key}", self.client.upload_file, str(path), self.bucket, key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(f"s3://{self.bucket}/{key}", self.client.put_object, Bucket=self.bucket, Key=key, Body=data)

    def delete(self, key: str) -> None:
        self._call(f"s3://{self.bucket}/{key}", self.client.delete_object, Bucket=self.bucket, Key=key)

    def map(self, fn: Callable, items, threads: int = 16) -> list:
        """fn over items in threads (requests wait on the network, not the GIL); the first error raises."""
        items = list(items)
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="hvpmtl-s3") as pool:
            return list(pool.map(fn, items))


def dali_environment(store: ObjectStore) -> dict:
    """What DALI's own S3 client (the AWS C++ SDK) needs in the environment to reach the same endpoint:
    it reads AWS_ENDPOINT_URL but not ~/.aws/config's endpoint_url. Returns the variables it set."""
    setv = {}
    ep = store.endpoint or ""
    aws = re.match(r"^https://s3[.-]([a-z0-9-]+\.)?amazonaws\.com", ep)
    if ep and not aws and not os.environ.get("AWS_ENDPOINT_URL"):
        setv["AWS_ENDPOINT_URL"] = ep
    os.environ.update(setv)
    return setv
