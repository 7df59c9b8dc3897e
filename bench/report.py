"""Writing a command's figures."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable


def write_json(path: Path | None, body: dict, what: str = "report") -> None:
    """Write a command's figures as JSON (creating the folder) and say where."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(f"{what} written to {path}")


def timed_main(args, run: Callable[[object], dict], format_table: Callable[[dict], str]) -> int:
    """A benchmark's main after parsing: log at INFO, run, add the wall time, print the table,
    write the JSON to ``args.json``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    result = run(args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(format_table(result))
    write_json(args.json, result, "results")
    return 0
