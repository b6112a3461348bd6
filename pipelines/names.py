"""Checks on names that users send (model, LoRA, upscaler), before they are looked up on disk."""

from pathlib import PurePosixPath, PureWindowsPath

from pipelines.errors import InvalidNameError


def check_user_name(value: str, field: str, allow_one_slash: bool = False) -> str:
    """Rejects names that could reach outside their folder. Returns the name, stripped.

    Lookups only ever match names found by scanning the folder, so this is a second line of defence, and
    it turns an attempt into a clear 400 instead of a confusing "not found".
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
