"""Searching the configured vectors table, with queries embedded the way the table's vectors were.

The table records the embedder configuration it was built with (`pipelines.table`). A query is embedded by
the replica's embedder and, when the table was built at a smaller Matryoshka dimension of the same
configuration, truncated (and re-normalised) to it, which is exactly what that configuration computes.
Anything else that differs is refused (409) with the differences named. A table made by `vlm-embed reduce`
gets the query projected with its stored PCA, whatever its storage type, in `pipelines.table_query`, as every
other search path does; `mode` text and hybrid use the table's full-text index (LanceDB's hybrid query).
The table is reopened for every
query (a few milliseconds), so rows a backfill adds are seen at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.config import EmbedderConfig, TableConfig
from serve.errors import ApiError


@dataclass(frozen=True)
class QueryPlan:
    """An opened table and the dimension a query vector must be cut to for it."""

    table: Any
    dimension: int


class SearchTable:
    """The vectors table named in the config, checked against the replica's embedder on every query."""

    def __init__(self, table_config: TableConfig, embedder_config: EmbedderConfig, embedder_dimension: int):
        self.table_config = table_config
        self.embedder_config = embedder_config
        self.embedder_dimension = embedder_dimension

    def plan(self) -> QueryPlan:
        """Open the table and check that queries can be embedded with its configuration (404 / 409 if not)."""
        from pipelines.table import (
            TableConfigMismatch,
            TableNotFound,
            check_matches,
            open_vectors_table,
            recorded_embedder_config,
        )

        try:
            table = open_vectors_table(self.table_config)
        except TableNotFound as exc:
            raise ApiError(
                404, f"{exc}: run a backfill first", param="table", code="table_not_found"
            ) from exc
        try:
            recorded = recorded_embedder_config(table)
            config, dimension = self.embedder_config, self.embedder_dimension
            if recorded.dimensions is not None and recorded.dimensions < dimension:
                config = config.model_copy(update={"dimensions": recorded.dimensions})
                dimension = recorded.dimensions
            check_matches(table, config, dimension)
        except TableConfigMismatch as exc:
            raise ApiError(
                409,
                f"{exc}; this server embeds queries with model {self.embedder_config.model!r}, so its vectors "
                "would not be comparable",
                param="table",
                code="table_config_mismatch",
            ) from exc
        return QueryPlan(table=table, dimension=dimension)

    @staticmethod
    def check_filter(plan: QueryPlan, where: str | None) -> None:
        """422 for a filter that is not one condition on the table's columns, before the query is embedded."""
        from pipelines.filters import FilterError, check_filter

        if not where:
            return
        try:
            check_filter(where, plan.table.schema.names)
        except FilterError as exc:
            raise ApiError(422, str(exc), param="filter", code="invalid_filter") from exc

    @staticmethod
    def check_mode(plan: QueryPlan, mode: str, text: str | None, image: Any, param: str = "mode") -> None:
        """422 for a query the mode cannot run (text without a text, text with an image, no full-text index),
        before the query is embedded; `param` names the request's field (`retrieval.mode` in chat)."""
        from pipelines.table_query import SearchModeError, check_mode, has_text_index

        try:
            check_mode(mode, text, image)
        except SearchModeError as exc:
            raise ApiError(422, str(exc), param=param, code="invalid_value") from exc
        if mode != "vector" and not has_text_index(plan.table):
            raise ApiError(
                422,
                f"table {plan.table.name!r} has no full-text index on 'text', which mode {mode!r} needs",
                param=param,
                code="invalid_value",
            )

    @staticmethod
    def search(
        plan: QueryPlan, vector, top_k: int, where: str | None, mode: str = "vector", text: str | None = None
    ) -> list[dict[str, Any]]:
        """The `top_k` best rows (id, score, text, modality, image_uri) for the mode; a reduced table's query is
        projected with its PCA (`pipelines.table_query`). A bad filter is a 422: one that is not exactly one
        condition on the table's columns (`pipelines.filters`), or one LanceDB refuses."""
        from pipelines.filters import FilterError
        from pipelines.table import search_table

        try:
            return search_table(plan.table, vector, top_k=top_k, where=where, mode=mode, text=text)
        except FilterError as exc:
            raise ApiError(422, str(exc), param="filter", code="invalid_filter") from exc
        except ValueError as exc:
            if where is None:
                raise
            raise ApiError(
                422, f"filter is not valid for this table: {exc}", param="filter", code="invalid_filter"
            ) from exc
