"""The one exception tree of distml.

Every error a user can cause or fix is a :class:`DistmlError`. The CLI prints its message on one line (no
traceback) and exits with :attr:`DistmlError.exit_code`; the model server answers a :class:`RequestError` with
its ``status`` and ``{"error": message}`` in one handler. Messages name the offending value and, through
``hint``, the fix.
"""

from __future__ import annotations


class DistmlError(Exception):
    """Base class. ``exit_code`` 1 means "the operation failed"; usage errors use 2."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(DistmlError):
    """The command line or a config file asks for something that cannot be (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A config value is invalid; the message names the field."""


class NotFoundError(UsageError):
    """A reference that resolves to nothing, or to more than one thing.

    Datasets, training runs, model folders, and registered models with their versions and aliases.
    """


class WorkspaceError(DistmlError):
    """The workspace folder cannot be created, written or read."""


class DataError(DistmlError):
    """Base for problems with dataset sources or the dataset store."""


class SourceNotFoundError(DataError):
    """The source files of a dataset are not where they were looked for (and could not be downloaded)."""


class DownloadError(DataError):
    """Every mirror failed; the message lists why for each."""


class ChecksumError(DataError):
    """A file's content does not match its published checksum."""


class FormatError(DataError):
    """A source file is not in the format it claims (bad IDX magic, truncated gzip, wrong record size...)."""


class UnsafeArchiveError(DataError):
    """An archive member would escape the target, is a link or device, or the archive exceeds its caps."""


class BadImageError(DataError):
    """An image file cannot be decoded, or is too large (decompression bomb)."""


class CorruptDatasetError(DataError):
    """A stored dataset does not match its manifest: edited by hand, or a shard changed on disk."""


class TrainingError(DistmlError):
    """A training job failed: a worker crashed, the loss diverged, or a checkpoint cannot be resumed."""


class ResumeError(TrainingError):
    """The run folder holds a checkpoint that this job must not continue (other dataset, incompatible config)."""


class ClusterError(DistmlError):
    """The Ray cluster cannot be reached, refuses this client (token), or lost what a job needs."""


class ModelError(DistmlError):
    """A model artifact cannot be exported, verified or loaded (parity failed, corrupt ``model.onnx``)."""


class PipelineError(DistmlError):
    """``distml run`` cannot start or finish: the workspace is locked by another run, or a step failed."""


class RegistryError(DistmlError):
    """The model registry refuses an operation (unknown model, alias or version; nothing to roll back to)."""

    exit_code = 2


class RequestError(DistmlError):
    """A model-server client sent something the server will not process; ``status`` is the HTTP status code.

    The server turns every one of these into ``{"error": message}`` with ``status`` in one place; anything else
    raised while serving is an internal error, logged with the request id and answered with a generic 500.
    """

    status = 400

    def __init__(self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.headers = headers or {}


class PayloadTooLargeError(RequestError):
    """The body, an image, or the number of instances is over the server's limits (413)."""

    status = 413


class OverloadedError(RequestError):
    """The queue is full or the request waited too long for the model (503 with ``Retry-After``)."""

    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after_s)})
