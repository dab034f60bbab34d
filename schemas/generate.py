"""Write the JSON Schema of every event type into ``schemas/jsonschema/`` (``make schemas``).

A test fails when a checked-in file differs from what the pydantic models generate."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.events import EventType, event_json_schema

OUT_DIR = Path(__file__).with_name("jsonschema")


def rendered() -> dict[str, str]:
    return {
        f"{t.value}.json": json.dumps(event_json_schema(t), indent=2, sort_keys=True) + "\n"
        for t in EventType
    }


def main() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    for stale in OUT_DIR.glob("*.json"):
        stale.unlink()
    for name, text in rendered().items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(rendered())} schemas to {OUT_DIR}")


if __name__ == "__main__":
    main()
