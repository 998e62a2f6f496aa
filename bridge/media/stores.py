"""Where kept files live, named by their SHA-256 (CONTRACT §9): a local directory
(`file:///var/lib/postback-bridge/media`) or an S3-compatible bucket (`s3://bucket/prefix`,
through aiobotocore). The same file from two MMS is kept once; keeping it again makes it young
again, so `media.keep` counts from the last MMS that sent it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import tempfile
import time
from typing import Any

from bridge.config import MediaConfig
from bridge.errors import BridgeError
from bridge.media.links import DIGEST


class MediaStoreError(BridgeError):
    """The media store cannot be reached or written now (a retry may do)."""


def _name(digest: str) -> str:
    if not DIGEST.fullmatch(digest):  # never a path of the caller's making
        raise ValueError(f"not a SHA-256 hex digest: {digest[:80]!r}")
    return digest


class MediaStore(abc.ABC):
    async def open(self) -> None:  # noqa: B027 (optional hook)
        """Connect (S3); a directory needs nothing."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Let go of what `open` took."""

    @abc.abstractmethod
    def describe(self) -> str: ...

    @abc.abstractmethod
    async def put(self, digest: str, data: bytes, content_type: str) -> None:
        """Keep `data` under `digest` (idempotent; a kept file is made young again)."""

    @abc.abstractmethod
    async def get(self, digest: str) -> bytes | None:
        """The file, or None when it is not kept (never was, or purged)."""

    @abc.abstractmethod
    async def purge(self, before: float) -> int:
        """Delete the files last kept before `before` (Unix time); how many."""


class FileStore(MediaStore):
    def __init__(self, root: str) -> None:
        self.root = root

    def describe(self) -> str:
        return f"directory {self.root}"

    def _path(self, digest: str) -> str:
        return os.path.join(self.root, _name(digest))

    async def put(self, digest: str, data: bytes, content_type: str) -> None:
        try:
            await asyncio.to_thread(self._write, self._path(digest), data)
        except OSError as exc:
            raise MediaStoreError(f"cannot keep a file in {self.root}: {exc.strerror or exc}") from exc

    def _write(self, path: str, data: bytes) -> None:
        if os.path.exists(path):
            os.utime(path)  # kept again: young again
            return
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        # written whole under another name and renamed: a reader never sees half a file
        fd, temporary = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    async def get(self, digest: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                with open(self._path(digest), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        try:
            return await asyncio.to_thread(read)
        except OSError as exc:
            raise MediaStoreError(f"cannot read a kept file in {self.root}: {exc.strerror or exc}") from exc

    async def purge(self, before: float) -> int:
        def sweep() -> int:
            count = 0
            try:
                entries = list(os.scandir(self.root))
            except FileNotFoundError:
                return 0
            for entry in entries:
                stale = entry.name.startswith(".incoming-") and entry.stat().st_mtime < time.time() - 3600
                if (DIGEST.fullmatch(entry.name) and entry.stat().st_mtime < before) or stale:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        count += 1
            return count

        try:
            return await asyncio.to_thread(sweep)
        except OSError as exc:
            raise MediaStoreError(f"cannot purge {self.root}: {exc.strerror or exc}") from exc


class S3Store(MediaStore):
    """An S3-compatible bucket through aiobotocore; credentials from `media.s3`, else from
    botocore's usual places (the environment, a profile, the instance's role)."""

    def __init__(self, url: str, config: MediaConfig) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.settings = config.s3
        self.timeout = config.timeout
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    def describe(self) -> str:
        where = f" at {self.settings.endpoint_url}" if self.settings.endpoint_url else ""
        return f"S3 bucket {self.bucket}{'/' + self.prefix if self.prefix else ''}{where}"

    async def open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        s = self.settings
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=s.region or "us-east-1",
                aws_access_key_id=s.access_key_id.reveal() if s.access_key_id else None,
                aws_secret_access_key=s.secret_access_key.reveal() if s.secret_access_key else None,
                config=AioConfig(connect_timeout=self.timeout, read_timeout=self.timeout, retries={"max_attempts": 1}),
            )
        )
        self._stack = stack

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = self._client = None

    def _key(self, digest: str) -> str:
        return self.prefix + _name(digest)

    async def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            raise MediaStoreError("the media store is not open")
        try:
            return await getattr(self._client, method)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(kwargs.get("Key")) from exc
            raise MediaStoreError(f"S3 {what}: {code or exc}") from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise MediaStoreError(f"S3 {what}: {type(exc).__name__}: {exc}") from exc

    async def put(self, digest: str, data: bytes, content_type: str) -> None:
        # put again when kept already: its Last-Modified, which the purge reads, is now
        await self._call("put", "put_object", Key=self._key(digest), Body=data, ContentType=content_type)

    async def get(self, digest: str) -> bytes | None:
        try:
            answer = await self._call("get", "get_object", Key=self._key(digest))
        except FileNotFoundError:
            return None
        try:
            async with answer["Body"] as body:
                data: bytes = await body.read()
                return data
        except (OSError, TimeoutError) as exc:
            raise MediaStoreError(f"S3 get: {type(exc).__name__}: {exc}") from exc

    async def purge(self, before: float) -> int:
        count, token = 0, None
        while True:
            extra: dict[str, Any] = {"ContinuationToken": token} if token else {}
            page = await self._call("list", "list_objects_v2", Prefix=self.prefix, **extra)
            stale = [
                {"Key": item["Key"]}
                for item in page.get("Contents", [])
                if DIGEST.fullmatch(item["Key"][len(self.prefix) :]) and item["LastModified"].timestamp() < before
            ]
            if stale:
                await self._call("purge", "delete_objects", Delete={"Objects": stale, "Quiet": True})
                count += len(stale)
            if not page.get("IsTruncated"):
                return count
            token = page.get("NextContinuationToken")


def open_media_store(config: MediaConfig) -> MediaStore:
    """The store `media.store` names (not opened yet)."""
    if config.store.startswith("s3://"):
        return S3Store(config.store, config)
    return FileStore(config.store.removeprefix("file://"))
