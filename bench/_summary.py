"""The last line every benchmark prints: its JSON summary, also written to ``--out`` when given."""

import json
import os


def emit(summary: dict, out: str | None) -> None:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
