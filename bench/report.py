"""Writing a command's figures."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path | None, body: dict, what: str = "report") -> None:
    """Write a command's figures as JSON (creating the folder) and say where."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(f"{what} written to {path}")
