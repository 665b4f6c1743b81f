"""Errors a user can act on, each with the exit code the CLI and jobs/ return for it."""

from __future__ import annotations


class ShardgenError(Exception):
    exit_code = 1


class SpecError(ShardgenError):
    """The job spec is invalid (a wrong field name or value)."""

    exit_code = 2


class ManifestError(ShardgenError):
    """The manifest cannot run at all (a missing column, a wrong type, null or duplicate ids)."""

    exit_code = 2


class ModelError(ShardgenError):
    """A model source cannot be resolved (an unknown built-in, a missing folder, no safetensors)."""

    exit_code = 2


class StorageError(ShardgenError):
    """Object storage kept failing (throttling, 5xx errors, dropped connections) after every retry."""

    exit_code = 1


class NoProgressError(ShardgenError):
    """Ray Data stopped the job after its no-progress timeout: nothing moved (a stage whose actors
    fit on no node, a cluster waiting for capacity that never came)."""

    exit_code = 1


# Exit codes, documented in docs/reference.md ("Exit codes").
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_ROWS_FAILED = 3
