"""Types for the pydantic models of settings and check options."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field

from checks.api import parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
"""Seconds, written as 30s, 10m, 1.5h, 2d, 1w (one unit: ms s m h d w) or a number."""

Period = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
"""A Duration that may be 0, for a period whose 0 means never."""
