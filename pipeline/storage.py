"""The one place that turns a URI into a filesystem.

Every URI (``s3://bucket/key``, ``gs://...``, ``file:///path`` or a plain local path) becomes an
fsspec filesystem plus a path on it. Options come from the spec's ``storage`` section; fields left
unset fall back to the usual AWS_* variables (AWS_ENDPOINT_URL included), which s3fs and botocore
read themselves. Ray Data gets the same filesystem wrapped for pyarrow, so the driver, the
readers and the writers all see one configuration.
"""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
from fsspec.core import url_to_fs

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


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(uri: str, storage: StorageSpec | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
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
        fs.pipe_file(path, data)


def exists(uri: str, storage: StorageSpec | None = None) -> bool:
    fs, path = filesystem(uri, storage)
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
    files = list_files(uri, storage)
    if not files:
        raise FileNotFoundError(f"no files under {uri}")
    for name in files:
        local = dest / name
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{path}/{name}", str(local))
