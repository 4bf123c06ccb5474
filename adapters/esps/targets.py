"""ESP targets: each configured ESP account and audience the sync keeps up to date.

A target has a name (the key of its sync state in every profile, ``esp.<name>``), a kind
(a registered ESP), where and how to reach it, and its own field mapping.
Targets come from the ESP file (``MERGETAG_ESP_FILE``, TOML), one table per target::

    [mailchimp]
    kind = "mailchimp"
    audience = "a1b2c3"                     # the Mailchimp list id
    api_key_env = "MAILCHIMP_MAIN_KEY"      # secrets stay in the environment
    [mailchimp.fields]
    first_name = "FNAME"
    lifetime_value = { tag = "LTV", type = "number" }

(or the same as JSON, in a file ending in ``.json``), or, without a file, from ``MERGETAG_ESPS``
(e.g. ``mailchimp,sendgrid``) and each kind's ``MERGETAG_<KIND>_*`` variables (:class:`TargetEnv`).
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from adapters.esps.fields import MappingEntry


class EspTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="A registered ESP kind (adapters/esps/registry.py).")
    api_key: SecretStr | None = Field(None, description="Prefer api_key_env: the file then holds no secret.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key.")
    base_url: str | None = Field(None, description="API root; default: the ESP's own.")
    audience: str | None = Field(None, description="The list id (required where the ESP needs one, e.g. Mailchimp).")
    fields: dict[str, MappingEntry] = Field(default_factory=dict, description="trait -> merge tag / property / custom field.")
    timeout_s: float = 10.0
    job_timeout_s: float = Field(300.0, description="How long a bulk job may run before its send is retried.")
    max_connections: int = Field(10, gt=0, description="Simultaneous requests across every sync process.")
    rates: dict[str, list[tuple[int, float]]] | None = Field(
        None, description="bucket -> [(requests, window seconds)]; default: the ESP's published limits.")

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        from adapters.esps.registry import DESCRIPTORS  # the registry imports every ESP, and they import this module

        if kind not in DESCRIPTORS:
            raise ValueError(f"unknown ESP kind {kind!r} (known: {', '.join(DESCRIPTORS)})")
        return kind

    @model_validator(mode="after")
    def _read_key(self) -> EspTarget:
        """Read the key from its environment variable once, when the configuration is loaded."""
        if self.api_key is None and self.api_key_env and os.environ.get(self.api_key_env):
            self.api_key = SecretStr(os.environ[self.api_key_env])
        return self

    def key(self) -> str:
        """The API key. Raises ValueError when it is configured nowhere."""
        if self.api_key is None:
            where = f"environment variable {self.api_key_env}" if self.api_key_env else "api_key"
            raise ValueError(f"no API key for this {self.kind} target ({where} is not set)")
        return self.api_key.get_secret_value()


class TargetEnv(BaseSettings):
    """One target of a kind from the environment, ``MERGETAG_<KIND>_API_KEY``, ``_BASE_URL``,
    ``_LIST_ID``, ``_FIELDS`` (JSON), ``_TIMEOUT_S``, ``_MAX_CONNECTIONS``. Each ESP subclasses it
    with its prefix. There is no default key: a target without one fails at start-up."""

    api_key: SecretStr | None = None
    base_url: str | None = None
    list_id: str | None = None
    fields: Annotated[dict[str, MappingEntry], NoDecode] = Field(default_factory=dict)
    timeout_s: float = 10.0
    max_connections: int = Field(10, gt=0)

    @field_validator("fields", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    def target(self, kind: str, job_timeout_s: float, default_fields: dict[str, str]) -> EspTarget:
        """The target these variables describe; without ``_FIELDS``, the ESP's default fields."""
        fields = self.fields if "fields" in self.model_fields_set else dict(default_fields)
        return EspTarget(kind=kind, api_key=self.api_key, base_url=self.base_url, audience=self.list_id, fields=fields,
                         timeout_s=self.timeout_s, max_connections=self.max_connections, job_timeout_s=job_timeout_s)


def load_file(path: str) -> dict[str, EspTarget]:
    """Targets from a TOML file (or JSON, by its suffix): one table per target, named by the table.

    Raises ValueError (pydantic's ValidationError) naming the target and the field that is wrong.
    """
    text = Path(path).read_text()
    raw = json.loads(text) if path.endswith(".json") else tomllib.loads(text)
    return {name: EspTarget.model_validate(table) for name, table in raw.items()}
