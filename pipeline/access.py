"""Where a manifest's image and mask URIs may point: a manifest reads its own data, nothing else.

By default a URI must lie under the manifest's own bucket (``s3://BUCKET/`` for an ``s3://``
manifest) or, for a local manifest, under its folder; ``storage.allowed_prefixes`` adds more. A
relative URI resolves against the manifest's folder. A URI is normalised before the check (``..``
segments, percent-encoded dots and slashes, backslashes, and symlinks of local paths), and the
normalised form is the one that is read, so what was checked is what gets read.
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict

from pipeline import storage
from pipeline.spec import JobSpec


class OutsideError(ValueError):
    """A URI that the job may not read."""


class Access(BaseModel):
    """The prefixes (normalised, each ending in "/") a job may read inputs under, and the folder
    that relative URIs resolve against."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str
    prefixes: tuple[str, ...]


def normalise(uri: str, base: str) -> str:
    """``uri`` in canonical form: scheme in lower case, no ``.`` or ``..`` segments, a relative URI
    joined to the folder ``base``, a local path absolute with its symlinks resolved."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        scheme = scheme.lower()
        if scheme != "file":
            return f"{scheme}://" + posixpath.normpath("/" + rest.lstrip("/")).lstrip("/")
        uri = rest
    path = os.path.expanduser(uri)
    if os.path.isabs(path):
        return os.path.realpath(path)
    return normalise(f"{base.rstrip('/')}/{path}", base)


def _folder(uri: str, base: str) -> str:
    return normalise(uri, base).rstrip("/") + "/"


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri else "."


def policy(manifest: str, manifest_is_folder: bool, allowed: list[str]) -> Access:
    """The access of a job whose manifest is ``manifest``, widened by the ``allowed`` prefixes."""
    if storage.is_remote(manifest):
        scheme, rest = normalise(manifest, "/").split("://", 1)
        own = f"{scheme}://{rest.split('/', 1)[0]}/"
    else:
        own = None
    base = _folder(manifest if manifest_is_folder else _parent(manifest), os.getcwd())
    prefixes = [own or base, *(_folder(p, os.getcwd()) for p in allowed)]
    return Access(base=base, prefixes=tuple(dict.fromkeys(prefixes)))


def for_job(spec: JobSpec) -> Access:
    """The access of ``spec`` (run on the driver: it asks storage whether the manifest is a folder)."""
    return policy(spec.manifest, storage.is_folder(spec.manifest, spec.storage), spec.storage.allowed_prefixes)


def check(uri: str, access: Access) -> str:
    """The normalised form of ``uri`` to read, or OutsideError when it lies outside every prefix."""
    if "::" in uri:  # fsspec would chain filesystems and read something else than the URI names
        raise OutsideError(f"{uri} is a chained URL (::), which is not allowed")
    resolved = normalise(uri, access.base)
    # A decoded form that would escape counts as an escape: some filesystems decode %2e%2e or "\".
    decoded = normalise(unquote(uri).replace("\\", "/"), access.base)
    for form in (resolved, decoded):
        if not any(form.startswith(prefix) for prefix in access.prefixes):
            shown = uri if form == uri else f"{uri} (resolved: {form})"
            raise OutsideError(f"{shown} is outside the allowed prefixes ({', '.join(access.prefixes)})")
    return resolved
