"""Reading a JSON object from a model's or an adapter's directory, with errors that say which file and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path, error: type[Exception], missing: str) -> dict[str, Any]:
    """The object in `path`; raises `error` with `missing` when the file is absent, and naming the file
    when it is not valid JSON or holds something other than an object."""
    if not path.is_file():
        raise error(missing)
    try:
        # JSON files are UTF-8 (RFC 8259); the locale's encoding would read them differently per machine.
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:  # e.g. UTF-16, as Windows editors and PowerShell's Out-File write
        raise error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object")
    return value
