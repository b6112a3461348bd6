"""Checks on names that users send (model, LoRA, upscaler), before they are looked up on disk, and the
lookup of named files in a folder (LoRAs, upscalers)."""

import logging
from pathlib import Path, PurePosixPath, PureWindowsPath

from pipelines.errors import InvalidNameError, InvalidRequestError

logger = logging.getLogger(__name__)


def check_user_name(value: str, field: str, allow_one_slash: bool = False) -> str:
    """Rejects names that could reach outside their folder. Returns the name, stripped.

    Lookups only ever match names found by scanning the folder, so this is a second line of defence, and
    it turns an attempt into a 404 that says why the name can never be found.
    """
    name = value.strip()
    if not name:
        raise InvalidNameError(f"'{field}' must not be empty", field=field)
    if "\x00" in name:
        raise InvalidNameError(f"'{field}' must not contain NUL bytes", field=field)
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or name.startswith("~"):
        raise InvalidNameError(f"'{field}' must be a name, not an absolute path: {name!r}", field=field)
    parts = name.replace("\\", "/").split("/")
    if any(part in ("..", ".") for part in parts):
        raise InvalidNameError(f"'{field}' must not contain '..' or '.' path parts: {name!r}", field=field)
    if len(parts) > (2 if allow_one_slash else 1) or any(not part for part in parts):
        raise InvalidNameError(f"'{field}' must be a plain name without path separators: {name!r}", field=field)
    return name


def scan_named_files(folder: Path, suffixes: tuple[str, ...], allow_external_links: bool) -> list[tuple[str, Path]]:
    """(name, path) of the files with `suffixes` under `folder` (subfolders too), sorted. The name is the path
    under the folder without extension, '/'-separated. Symlinks pointing outside the folder are skipped unless
    `allow_external_links`."""
    if not folder.is_dir():
        return []
    root = folder.resolve()
    found = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if not allow_external_links and not path.resolve().is_relative_to(root):
            logger.warning("skipping %s: it links outside %s", path, folder)
            continue
        found.append((path.relative_to(folder).with_suffix("").as_posix(), path))
    return found


def scan_files_and_folders(folder: Path, suffixes: tuple[str, ...], folder_weights: tuple[str, ...],
                           allow_external_links: bool) -> list[tuple[str, Path]]:  # fmt: skip
    """(name, path) of the weights files with `suffixes` and of the diffusers folders (a `config.json` beside
    one of `folder_weights`) under `folder`, sorted; a folder's own weights file is part of the folder, not a
    file of its own."""
    folders = []
    if folder.is_dir():
        for config in sorted(folder.rglob("config.json")):
            if any((config.parent / name).exists() for name in folder_weights):
                folders.append((config.parent.relative_to(folder).as_posix(), config.parent))
    files = scan_named_files(folder, suffixes, allow_external_links)
    files = [(name, path) for name, path in files if not any(path.is_relative_to(found) for _, found in folders)]
    return sorted(files + folders)


def find_named_file(
    requested: str, files: list[tuple[str, Path]], suffixes: tuple[str, ...], field: str, kind: str
) -> tuple[str, Path] | None:
    """The file a user's name means: the exact name (with or without extension), then the name in any case,
    then the file name alone when it is unique. None when nothing matches; a 4xx when several do."""
    name = check_user_name(requested, field, allow_one_slash=True)
    stem = name[: -len(suffix)] if (suffix := Path(name).suffix.lower()) in suffixes else name
    for candidates in (
        [item for item in files if item[0] == stem],
        [item for item in files if item[0].lower() == stem.lower()],
        [item for item in files if item[1].stem.lower() == Path(stem).name.lower()],
    ):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            options = ", ".join(repr(item_name) for item_name, _ in candidates)
            raise InvalidRequestError(f"{kind} {requested!r} is ambiguous; use one of {options}", field=field)
    return None
