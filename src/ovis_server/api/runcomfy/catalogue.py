"""The catalogue as the API shows it: RunComfy's model list, model pages and categories,
and OpenAI's model list, all read from the deployment's ModelRegistry."""

from __future__ import annotations

from typing import Any

from ovis_server.api.errors import MODEL_NOT_FOUND, ApiError
from ovis_server.api.runcomfy.protocol import (
    CatalogueQuery,
    CategoryList,
    ModelDetail,
    ModelList,
    ModelSummary,
    OpenAIModel,
)
from ovis_server.catalogue.registry import ModelRegistry
from ovis_server.catalogue.spec import ModelSpec


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its ``$defs`` written in place, for clients that do not follow $ref."""
    definitions = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def _summary(spec: ModelSpec) -> dict[str, Any]:
    return {
        "model_id": spec.model_id,
        "display_name": spec.display_name,
        "description": spec.description,
        "base_price_usd": spec.base_price_usd,
        "categories": list(spec.categories),
        "kind": spec.kind,
        "tags": list(spec.categories),
    }


class CataloguePages:
    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def list_models(self, query: CatalogueQuery | None = None) -> ModelList:
        """One page of the catalogue entries that pass the filters; ``total`` counts them all."""
        query = query or CatalogueQuery()
        matches = self.models.search(query.search, query.category, query.kind)
        page = matches[query.offset : query.offset + query.limit]
        return ModelList(
            models=[
                ModelSummary(
                    **_summary(spec),
                    input_schema=(
                        inline_refs(spec.input_schema()) if query.include_schema else None
                    ),
                )
                for spec in page
            ],
            total=len(matches),
            data=[
                OpenAIModel(id=spec.model_id, created=spec.created, owned_by=spec.owned_by)
                for spec in page
            ],
        )

    def categories(self) -> CategoryList:
        return CategoryList(categories=self.models.categories())

    def model(self, model_id: str) -> ModelDetail:
        spec = self.spec(model_id)
        return ModelDetail(
            **_summary(spec),
            input_schema=inline_refs(spec.input_schema()),
            output_schema=dict(spec.output_schema),
        )

    def spec(self, model_id: str) -> ModelSpec:
        """The model ``model_id`` (an id, or an alias as ``--model-id`` and OpenAI's ``model``
        take it) names, or a 404 that lists the ones there are."""
        spec = self.models.resolve(model_id)
        if spec is None:
            known = ", ".join(self.models.ids())
            raise ApiError(
                404, MODEL_NOT_FOUND, f"unknown model {model_id!r}; this server offers: {known}"
            )
        return spec
