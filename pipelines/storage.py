"""Where finished images are kept: a local folder (the default) or any fsspec URL (`s3://bucket/prefix`,
`gs://...`, `az://...`, `file:///mnt/shared/...`), so that every node, ingress and client reaches what any
generator wrote.

A stored image is named by its location, which is what job records keep as `output_path`: an absolute path
for a local folder, a URL otherwise. Writes are atomic: on a file system the bytes go to a temporary name in
the same folder and are renamed into place; object stores (S3, GCS, Azure) show an object only once its
upload is complete. The cloud file systems are optional packages (`pip install 'diffusion-api[s3]'`, `[gcs]`,
`[azure]`); fsspec names the one to install when it is missing.
"""

import contextlib
import datetime
import glob
import os
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipelines.errors import DiffusionAPIError


class StorageError(DiffusionAPIError):
    """The output storage cannot be reached or refused a write (the service's side: a 500)."""

    status_code = 500


class MissingImageError(DiffusionAPIError):
    """A finished job's image is no longer in the storage (pruned, or removed by hand)."""

    status_code = 404


def is_url(location: str) -> bool:
    return "://" in location


class OutputStorage:
    """Saves, reads and deletes images under one root. Blocking (fsspec's sync API): call it from a thread."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        try:
            if is_url(self.location):
                self.fs, self.root = fsspec.core.url_to_fs(self.location)
            else:
                self.fs, self.root = LocalFileSystem(), str(Path(self.location).expanduser().resolve())
        except (ImportError, ValueError) as error:  # an unknown protocol, or its package is not installed
            raise StorageError(f"outputs_dir {self.location!r}: {error}") from error
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"OutputStorage({self.location!r})"

    # Names ---------------------------------------------------------------------------------------------------
    def name_for(self, job_id: str, index: int, extension: str) -> str:
        """Where a job's image goes: `<date>/<job id>.<ext>`, the job's further images `<job id>-<i>.<ext>`."""
        suffix = f"-{index}" if index else ""
        return f"{self.root}/{datetime.date.today().isoformat()}/{job_id}{suffix}.{extension}"

    def _shown(self, path: str) -> str:
        """The name records keep: a plain path for local folders (as before URLs were possible), else a URL."""
        return path if not is_url(self.location) else self.fs.unstrip_protocol(path)

    def _path(self, stored: str) -> str:
        """The file system path of a stored name, checked to lie under this storage's root."""
        path = self.fs._strip_protocol(stored) if is_url(stored) else str(Path(stored))
        path = path.rstrip("/")
        if not path.startswith(self.root + "/") or "/../" in path:
            raise MissingImageError(f"{stored!r} is not in the output storage {self.location!r}")
        return path

    # Operations ------------------------------------------------------------------------------------------
    def save(self, job_id: str, index: int, extension: str, data: bytes) -> str:
        """Writes one image atomically; returns its stored name."""
        path = self.name_for(job_id, index, extension)
        self._write(path, data)
        return self._shown(path)

    def stage(self, job_id: str, index: int, extension: str, data: bytes, token: str) -> tuple[str, str]:
        """Writes one image of one attempt of a job under a name of that attempt's own (`token`), next to its
        final name; returns (staged name, final name). Two attempts of a job (a lapsed lease) never write or
        delete each other's files: only the attempt the job store records as the job's moves its files to the
        final names (`promote`)."""
        final = self.name_for(job_id, index, extension)
        staged = f"{final}.{token}.partial"
        self._write(staged, data)
        return self._shown(staged), self._shown(final)

    def promote(self, staged: str, final: str) -> None:
        """Moves a staged image to its final name, replacing what is there (another attempt's equal image)."""
        source, target = self._path(staged), self._path(final)
        try:
            if self.is_local:
                os.replace(source, target)
            else:
                self.fs.mv(source, target)
        except FileNotFoundError as error:
            raise MissingImageError(f"the staged image {staged} is no longer in the output storage") from error
        except Exception as error:
            raise StorageError(f"could not move {staged} to {final}: {type(error).__name__}: {error}") from error

    def save_input(self, job_id: str, field: str, extension: str, data: bytes) -> str:
        """Stores an input image of a job (img2img `image`, `mask`) once, so the job record refers to it
        instead of carrying its bytes: `inputs/<date>/<job id>-<field>.<ext>`."""
        path = f"{self.root}/inputs/{datetime.date.today().isoformat()}/{job_id}-{field}.{extension}"
        self._write(path, data)
        return self._shown(path)

    def _write(self, path: str, data: bytes) -> None:
        try:
            if self.is_local:
                # A temporary name in the same folder, then a rename: readers see the whole file or none.
                os.makedirs(os.path.dirname(path), exist_ok=True)
                temporary = f"{path}.{uuid.uuid4().hex}.tmp"
                try:
                    with open(temporary, "wb") as handle:
                        handle.write(data)
                    os.replace(temporary, path)
                finally:
                    if os.path.exists(temporary):
                        os.unlink(temporary)
            else:
                self.fs.pipe_file(path, data)  # one upload: the object appears complete or not at all
        except Exception as error:  # OSError locally; the cloud packages raise their own types
            raise StorageError(f"could not write {self._shown(path)}: {type(error).__name__}: {error}") from error

    def read(self, stored: str) -> bytes:
        path = self._path(stored)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError as error:
            raise MissingImageError(f"the image {stored} is no longer in the output storage") from error
        except Exception as error:
            raise StorageError(f"could not read {stored}: {type(error).__name__}: {error}") from error

    def read_recorded(self, final: str, staged: str | None = None) -> bytes:
        """A finished job's image by its final name, or, while the attempt that completed the job is still
        moving it there (a few milliseconds after the job is recorded done), by its staged name."""
        try:
            return self.read(final)
        except MissingImageError:
            if staged is None:
                raise
        try:
            return self.read(staged)
        except MissingImageError:
            return self.read(final)  # moved between the two reads

    def delete_staged(self, final: str) -> None:
        """Removes the staged files of every attempt of one image (`<final>.<token>.partial`), recorded or not:
        an attempt lost midway leaves its own, which no record names."""
        try:
            path = self._path(final)
            found = glob.glob(glob.escape(path) + ".*.partial") if self.is_local else self.fs.glob(path + ".*.partial")
        except Exception:  # not under the root, or a listing the storage refuses: nothing to remove here
            return
        for staged in found:
            with contextlib.suppress(FileNotFoundError):
                if self.is_local:
                    os.remove(staged)
                else:
                    self.fs.rm(staged)

    def delete(self, stored: str) -> None:
        """Removes one image; one already gone is fine."""
        with contextlib.suppress(FileNotFoundError, MissingImageError):
            self.fs.rm_file(self._path(stored))

    def available(self) -> bool:
        """Whether images can be written here (a local folder that is writable; a remote root that answers)."""
        try:
            if self.is_local:
                os.makedirs(self.root, exist_ok=True)
                return os.access(self.root, os.W_OK)
            self.fs.ls(self.root)
            return True
        except FileNotFoundError:
            return True  # an empty bucket prefix: it appears with the first image
        except Exception:
            return False
