"""The one place that turns a URI into a filesystem.

Every URI (``s3://bucket/key``, ``gs://...``, ``file:///path`` or a plain local path) becomes an
fsspec filesystem plus a path on it. Options come from the spec's ``storage`` section; fields left
unset fall back to the usual AWS_* variables (AWS_ENDPOINT_URL included), which s3fs and botocore
read themselves. Ray Data gets the same filesystem wrapped for pyarrow, so the driver, the
readers and the writers all see one configuration.

Transient S3 faults are retried in two layers, both set up here: botocore tries every request up to
``storage.max_attempts`` times with exponential backoff (throttling such as 503 SlowDown, 500/502/
503/504 answers, dropped or reset connections, timeouts), and s3fs re-issues a download whose body
broke off midway (and a request still throttled after botocore gave up) up to 5 times. A PUT is
retried whole: S3 stores an object only once all of its bytes arrived, so no retry can leave a
partial object. When the retries run out, the storage functions raise StorageError naming the URI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

from pipeline.errors import StorageError
from pipeline.spec import StorageSpec

REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https", "memory")


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def is_remote(uri: str) -> bool:
    return scheme(uri) != "file"


def _options(uri: str, storage: StorageSpec) -> dict:
    if scheme(uri) in ("s3", "s3a"):
        opts: dict = {}
        if storage.endpoint_url:
            opts["endpoint_url"] = storage.endpoint_url
        if storage.key:
            opts["key"] = storage.key.get_secret_value()
        if storage.secret:
            opts["secret"] = storage.secret.get_secret_value()
        if storage.token:
            opts["token"] = storage.token.get_secret_value()
        if storage.region:
            opts["client_kwargs"] = {"region_name": storage.region}
        if storage.anon:
            opts["anon"] = True
        # total_max_attempts counts the first try too (botocore's max_attempts counts only retries).
        retries = {"total_max_attempts": storage.max_attempts, "mode": storage.retry_mode}
        opts["config_kwargs"] = {"retries": retries}
        return opts
    if scheme(uri) == "file":
        return {"auto_mkdir": True}
    return {}


SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
MIN_SECRET_LENGTH = 12


def redact(message: str, storage: StorageSpec | None = None) -> str:
    """``message`` with every credential blanked out: storage libraries may echo their parameters
    in errors, and error text goes into rows and logs."""
    storage = storage or StorageSpec()
    secrets = [s.get_secret_value() for s in (storage.key, storage.secret, storage.token) if s is not None]
    secrets += [os.environ[name] for name in SECRET_VARIABLES if os.environ.get(name)]
    # A value shorter than this is no real credential (test setups use words like "testing"),
    # and blanking it would garble ordinary words of the message.
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def filesystem(uri: str, storage: StorageSpec | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path of ``uri`` on it."""
    storage = storage or StorageSpec()
    if scheme(uri) == "file":
        uri = str(Path(uri.removeprefix("file://")).expanduser().absolute())
    fs, path = url_to_fs(uri, **_options(uri, storage))
    return fs, path.rstrip("/") or "/"


def arrow_filesystem(uri: str, storage: StorageSpec | None = None) -> tuple[pafs.FileSystem, str]:
    """The same filesystem as :func:`filesystem`, in the pyarrow form that Ray Data takes."""
    fs, path = filesystem(uri, storage)
    if scheme(uri) == "file":
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _storage_faults() -> tuple[type[BaseException], ...]:
    from aiohttp import ClientError as AiohttpError
    from botocore.exceptions import BotoCoreError
    from botocore.parsers import ResponseParserError
    from urllib3.exceptions import HTTPError

    return OSError, BotoCoreError, ResponseParserError, AiohttpError, HTTPError


# Answers about the object itself, not faults of the service: callers handle these as they are.
_NOT_FAULTS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError)


@contextmanager
def guard(action: str, uri: str, storage: StorageSpec | None = None) -> Iterator[None]:
    """Turn a failure of object storage under ``uri`` (what is left once every retry failed) into
    a StorageError that names the URI."""
    try:
        yield
    except _NOT_FAULTS:
        raise
    except _storage_faults() as err:
        if not is_remote(uri):
            raise
        attempts = (storage or StorageSpec()).max_attempts
        raise StorageError(
            f"object storage: cannot {action} {uri}: {type(err).__name__}: {err} "
            f"(each request was tried up to {attempts} times; see storage.max_attempts)"
        ) from err


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(uri: str, storage: StorageSpec | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    with guard("read", uri, storage):
        return fs.cat_file(path)


def write_bytes(uri: str, data: bytes, storage: StorageSpec | None = None) -> None:
    """Write ``data`` whole: to a temporary name first, then moved into place, so that no reader
    sees a partial file (on object storage a single PUT is already atomic)."""
    fs, path = filesystem(uri, storage)
    if scheme(uri) == "file":
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:
        with guard("write", uri, storage):
            fs.pipe_file(path, data)


def exists(uri: str, storage: StorageSpec | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    with guard("look up", uri, storage):
        return fs.exists(path)


def is_folder(uri: str, storage: StorageSpec | None = None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.isdir(path)


def list_files(uri: str, storage: StorageSpec | None = None) -> list[str]:
    """The names of the files under the folder ``uri``, relative to it."""
    fs, path = filesystem(uri, storage)
    return [f[len(path):].lstrip("/") for f in fs.find(path) if not f.endswith("/")]


def download_folder(uri: str, dest: Path, storage: StorageSpec | None = None) -> None:
    """Copy every file under the folder ``uri`` into the local folder ``dest``."""
    fs, path = filesystem(uri, storage)
    with guard("list", uri, storage):
        files = list_files(uri, storage)
    if not files:
        raise FileNotFoundError(f"no files under {uri}")
    for name in files:
        local = dest / name
        local.parent.mkdir(parents=True, exist_ok=True)
        with guard("download", join(uri, name), storage):
            fs.get_file(f"{path}/{name}", str(local))
