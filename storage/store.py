"""The artifact store: one small API over fsspec for a local folder, ``memory://`` and ``s3://``.

Every write is atomic: a reader sees a whole file or no file. Locally that is a temp file in the
same folder plus ``os.replace``; on S3 a single PUT is atomic; ``memory://`` assigns one buffer.
``create_exclusive`` additionally refuses to replace an existing object: it is how manifests and
writer leases are committed without ever overwriting one.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import fsspec

from storage.errors import StoreError, mask_url

DEFAULT_STORE = "./dflash-store"
_MEMORY_LOCK = threading.Lock()


def default_store_url() -> str:
    return os.environ.get("DFLASH_STORE") or DEFAULT_STORE


class Store:
    """A store rooted at a URL. Paths given to its methods are relative to the root."""

    def __init__(self, url: str | os.PathLike[str] | None = None, *, check: bool = True) -> None:
        raw = str(url) if url is not None else default_store_url()
        if not raw.strip():
            raise StoreError("store URL is empty: pass --store PATH_OR_URL or set DFLASH_STORE")
        self.url, self.protocol, self.root = _parse(raw)  # url: for messages, secrets masked
        self.fs = _filesystem(self.protocol, self.url)
        if check:
            self.check()

    # ------------------------------------------------------------------ paths
    def path(self, rel: str = "") -> str:
        """Filesystem path (no protocol) of ``rel``, as fsspec methods take it."""
        rel = rel.strip("/")
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str = "") -> str:
        """Full URL of ``rel``: what DuckDB and users see."""
        p = self.path(rel)
        return p if self.protocol == "file" else f"{self.protocol}://{p}"

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Fail fast with one line if the store cannot be used (unreachable, no bucket, no creds)."""
        if self.protocol == "file":
            # Nothing is created here: a command that then fails on bad input leaves no empty
            # store behind. The first write creates the folders it needs.
            existing = Path(self.root)
            while not existing.exists() and existing.parent != existing:
                existing = existing.parent
            if not existing.is_dir():
                raise StoreError(f"store {self.url}: {existing} is a file, not a folder; pass a "
                                 "folder as --store")
            if not os.access(existing, os.W_OK):
                what = "folder is" if str(existing) == self.root else f"{existing} is"
                raise StoreError(f"store {self.url}: {what} not writable; pass a writable --store path")
        elif self.protocol == "memory":
            self.fs.makedirs(self.root, exist_ok=True)
        elif self.protocol == "s3":
            self._check_s3()

    def _check_s3(self) -> None:
        bucket = self.root.split("/", 1)[0]
        try:  # few retries: a wrong endpoint should fail in seconds, not minutes
            _filesystem("s3", self.url, attempts=2).ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StoreError(f"store {self.url}: bucket {bucket!r} does not exist; create it "
                             "(aws s3 mb s3://" + bucket + ") or pass another --store") from None
        except PermissionError:
            raise StoreError(f"store {self.url}: access denied to bucket {bucket!r}; check "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE") from None
        except Exception as e:  # botocore raises its own classes; map them to one line
            name = type(e).__name__
            if "Credential" in name:
                raise StoreError(f"store {self.url}: no AWS credentials found; set "
                                 "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
            if "Endpoint" in name or "Connect" in name or isinstance(e, OSError):
                endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
                raise StoreError(f"store {self.url}: cannot reach {endpoint} ({name}); check "
                                 "AWS_ENDPOINT_URL and the network") from None
            raise StoreError(f"store {self.url}: {name}: {_first_line(e)}") from None

    # ------------------------------------------------------------------ reads
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def ls(self, rel: str = "", detail: bool = False) -> list[Any]:
        """Entries directly under ``rel`` (names relative to the root); [] when it does not exist."""
        try:
            entries = self.fs.ls(self.path(rel), detail=True, refresh=True) if self.protocol == "s3" \
                else self.fs.ls(self.path(rel), detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = self.relative(e["name"])
            if name == rel.strip("/"):
                continue
            out.append({**e, "name": name} if detail else name)
        return out

    def find(self, rel: str = "") -> list[str]:
        """All files below ``rel``, relative to the root."""
        try:
            return sorted(self.relative(p) for p in self.fs.find(self.path(rel)))
        except FileNotFoundError:
            return []

    def relative(self, path: str) -> str:
        path = path.split("://", 1)[-1] if "://" in path else path
        if self.protocol == "memory":
            path = path if path.startswith("/") else "/" + path
        root = self.root.rstrip("/")
        if path == root:
            return ""
        if not path.startswith(root + "/"):
            raise ValueError(f"{path} is outside store root {root}")
        return path[len(root) + 1:]

    # ------------------------------------------------------------------ writes
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` atomically, replacing any previous object."""
        path = self.path(rel)
        if self.protocol == "file":
            _local_atomic_write(path, data, exclusive=False)
        elif self.protocol == "memory":
            with _MEMORY_LOCK:
                self.fs.pipe_file(path, data)
        else:
            self.fs.pipe_file(path, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write ``data`` only if nothing exists at ``rel``; return False if something already did."""
        path = self.path(rel)
        if self.protocol == "file":
            return _local_atomic_write(path, data, exclusive=True)
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True
        # S3 conditional PUT (If-None-Match: *): the server refuses to replace an existing key.
        try:
            self.fs.pipe_file(path, data, IfNoneMatch="*")
        except Exception as e:  # s3fs maps 412 PreconditionFailed to an OSError subclass or raw
            if "PreconditionFailed" in repr(e) or "412" in str(e) or isinstance(e, FileExistsError):
                return False
            raise
        return True

    def rm(self, rel: str, recursive: bool = False) -> None:
        path = self.path(rel)
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def put_file(self, local: str | os.PathLike[str], rel: str) -> None:
        """Upload a local file; locally an atomic copy."""
        if self.protocol == "file":
            _local_atomic_write(self.path(rel), Path(local).read_bytes(), exclusive=False)
        else:
            self.fs.put_file(str(local), self.path(rel))

    def open_input(self, rel: str):
        return self.fs.open(self.path(rel), "rb")


# ---------------------------------------------------------------------- helpers
def _parse(raw: str) -> tuple[str, str, str]:
    """Return (display url, protocol, root path without protocol)."""
    if "://" not in raw:
        root = str(Path(raw).expanduser().resolve())
        return raw, "file", root
    shown = mask_url(raw)
    scheme, rest = raw.split("://", 1)
    scheme = scheme.lower()
    if shown != raw:
        raise StoreError(f"store {shown}: credentials in a store URL are not used (and would be "
                         "logged); set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if scheme == "file":
        return raw, "file", str(Path(rest).expanduser().resolve())
    if scheme == "memory":
        root = "/" + rest.strip("/") if rest.strip("/") else "/dflash"
        return raw, "memory", root
    if scheme in ("s3", "s3a"):
        rest = rest.strip("/")
        bucket = rest.split("/", 1)[0]
        if len(bucket) < 3 or not all(c.islower() or c.isdigit() or c in "-." for c in bucket):
            raise StoreError(f"store {raw}: {bucket!r} is not a valid bucket name; use "
                             "s3://bucket/prefix with 3-63 lowercase letters, digits, dots or dashes")
        return raw, "s3", rest
    raise StoreError(f"store {shown}: unsupported scheme {scheme!r}; use a local path, memory:// "
                     "or s3://bucket/prefix")


def _filesystem(protocol: str, url: str, attempts: int = 8) -> fsspec.AbstractFileSystem:
    if protocol != "s3":
        return fsspec.filesystem(protocol)
    try:
        import s3fs  # noqa: F401  (import error is a set-up problem worth its own line)
    except ImportError:
        raise StoreError(f"store {url}: s3fs is not installed; run `make install`") from None
    # Endpoint and credentials come from the standard AWS variables (botocore reads
    # AWS_ENDPOINT_URL itself). Server errors (5xx: SlowDown, a bodiless 503 to a HEAD) are
    # retried by s3fs's own loop, which waits 0.1 s x 1.7^n (8 tries: ~9 s in all), rather than
    # botocore's, which waits up to 2^n s from the first retry: at 10% of requests failing that
    # is 1e-8 per request and about 0.1 s per failure. The reachability check tries twice, so a
    # wrong endpoint fails in seconds.
    import s3fs.core

    s3fs.core.set_custom_error_handler(_server_error)
    fs = fsspec.filesystem(
        "s3",
        skip_instance_cache=True,
        config_kwargs={"connect_timeout": 5, "read_timeout": 60,
                       "retries": {"max_attempts": 1 if attempts > 2 else 2, "mode": "standard"}},
    )
    fs.retries = attempts  # s3fs's own retry loop (a class attribute, not a constructor argument)
    return fs


def _server_error(e: BaseException) -> bool:
    """Whether s3fs should retry ``e``: an S3 answer with a 5xx status."""
    response = getattr(e, "response", None)
    status = (response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) \
        if isinstance(response, dict) else 0
    return 500 <= int(status or 0) < 600


def _local_atomic_write(path: str, data: bytes, exclusive: bool) -> bool:
    """Temp file in the target folder, fsync, then rename (or hard-link when exclusive)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:12]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            try:
                os.link(tmp, p)  # fails if p exists: never replaces a committed object
            except FileExistsError:
                return False
        else:
            os.replace(tmp, p)
            return True
    finally:
        if tmp.exists():
            tmp.unlink()
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
