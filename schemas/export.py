"""Export the published JSON Schema files: ``python -m schemas.export``.

The files in ``schemas/json/`` are the versioned contract; a test fails when
they drift from the models, so a model change must come with a re-export (and
a version bump when it is not backward compatible).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from schemas.delivery import DELIVERY_SCHEMA_VERSION, Delivery
from schemas.events import EVENT_SCHEMA_VERSION, Event
from schemas.profile import PROFILE_SCHEMA_VERSION, Profile
from schemas.sync import SYNC_STATE_SCHEMA_VERSION, SyncState

DIRECTORY = Path(__file__).with_name("json")


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema document, for every published model."""
    documents = {
        f"event.v{EVENT_SCHEMA_VERSION}.json": ("mergetag canonical event", TypeAdapter(Event).json_schema()),
        f"profile.v{PROFILE_SCHEMA_VERSION}.json": ("mergetag profile", Profile.model_json_schema()),
        f"delivery.v{DELIVERY_SCHEMA_VERSION}.json": ("mergetag delivery", Delivery.model_json_schema()),
        f"sync-state.v{SYNC_STATE_SCHEMA_VERSION}.json": ("mergetag sync state of one profile at one ESP target", SyncState.model_json_schema()),
    }
    return {
        name: {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"https://mergetag.dev/schemas/{name}", "title": title, **schema}
        for name, (title, schema) in documents.items()
    }


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main() -> None:
    DIRECTORY.mkdir(exist_ok=True)
    for name, document in schemas().items():
        (DIRECTORY / name).write_text(render(document))
        print(f"wrote schemas/json/{name}")


if __name__ == "__main__":
    main()
