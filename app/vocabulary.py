"""The words CellFuse's API, database and workers share, each defined once.

Literal types are the source: pydantic validates them at the API, and the tuples below (for the
database layer and messages) are derived from them.

>>> OBJECTS, ROLES
(('nuclei', 'cells'), ('instrument', 'scientist', 'admin'))
"""

from __future__ import annotations

from typing import Literal, get_args

JobStatusLiteral = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ObjectLiteral = Literal["nuclei", "cells"]
#: Roles in increasing order of rights: an instrument submits plates, a scientist trains and
#: curates the zoo, an admin manages keys and base models.
RoleLiteral = Literal["instrument", "scientist", "admin"]
#: Must equal ``app.science.label_fusion.FUSION_METHODS`` (a test keeps them equal; the science
#: core cannot import this module).
MethodLiteral = Literal["flow_fusion", "staple", "simple", "voting", "majority_voting"]
SplitLiteral = Literal["train", "val", "test"]
MetricLiteral = Literal["f1", "jaccard", "map_50_95"]

JOB_STATUSES: tuple[str, ...] = get_args(JobStatusLiteral)
OBJECTS: tuple[str, ...] = get_args(ObjectLiteral)
ROLES: tuple[str, ...] = get_args(RoleLiteral)
METHODS: tuple[str, ...] = get_args(MethodLiteral)

#: The alias a request uses when it names none; the only alias that may name no model yet.
DEFAULT_ALIAS = "production"
