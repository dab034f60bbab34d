"""The meter catalog (``meters.yaml``), validated into typed ``Meter`` objects.

A meter says which events it reads, which field of ``data`` is its value, how values combine and
which fields are kept as dimensions. The aggregator turns the catalog into SQL; adding a meter is
a change to ``meters.yaml`` only.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.events import DATA_MODELS, EventType

CATALOG_PATH = Path(__file__).with_name("meters.yaml")
_FIELD = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")


class Aggregation(StrEnum):
    SUM = "SUM"
    COUNT = "COUNT"
    UNIQUE_COUNT = "UNIQUE_COUNT"
    MIN = "MIN"
    MAX = "MAX"
    AVG = "AVG"
    LATEST = "LATEST"
    INTEGRAL = "INTEGRAL"


class Meter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    event_type: EventType
    aggregation: Aggregation
    value: str | None = None
    group_by: tuple[str, ...] = ()
    unit: str = ""
    description: str = ""
    max_gap_seconds: int | None = Field(default=None, ge=1, le=86_400)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        fields = DATA_MODELS[self.event_type].model_fields
        if self.aggregation is Aggregation.COUNT:
            if self.value is not None:
                raise ValueError(f"{self.slug}: COUNT takes no value")
        elif self.value is None:
            raise ValueError(f"{self.slug}: {self.aggregation} needs a value field")
        for name in (*self.group_by, *([self.value] if self.value else [])):
            if not _FIELD.match(name) or name not in fields:
                raise ValueError(f"{self.slug}: {name!r} is not a field of {self.event_type} data")
        if (self.aggregation is Aggregation.INTEGRAL) != (self.max_gap_seconds is not None):
            raise ValueError(f"{self.slug}: max_gap_seconds goes with INTEGRAL, and only with it")
        return self

    @property
    def is_gauge(self) -> bool:
        return self.aggregation is Aggregation.INTEGRAL


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    meters: tuple[Meter, ...]

    @model_validator(mode="after")
    def _unique_slugs(self) -> Self:
        slugs = [m.slug for m in self.meters]
        dup = {s for s in slugs if slugs.count(s) > 1}
        if dup:
            raise ValueError(f"duplicate meter slugs: {sorted(dup)}")
        return self

    def get(self, slug: str) -> Meter | None:
        return next((m for m in self.meters if m.slug == slug), None)


def load_catalog(path: Path = CATALOG_PATH) -> Catalog:
    with path.open() as fh:
        return Catalog.model_validate(yaml.safe_load(fh))


@cache
def default_catalog() -> Catalog:
    return load_catalog()
