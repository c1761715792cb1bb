"""The models one deployment serves, built from its settings: the built-in ones, and an
operator's own Ovis-Image checkpoints under ids of their own (``--extra-models``).

The served set is what ``--model-id`` names (ids or aliases, in that order; by default the
default model and every ``--extra-models`` entry): the API lists and takes exactly these, the
OpenAI route resolves its ``model`` names among them, and a worker loads them all and claims
only their jobs. A known model left out of the list is not offered (a 404, as for any id).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from ovis_server.catalogue.ovis_image import OVIS_IMAGE
from ovis_server.catalogue.spec import ModelSpec
from ovis_server.catalogue.z_image import Z_IMAGE_TURBO
from ovis_server.catalogue.z_image_edit import Z_IMAGE_EDIT
from ovis_server.catalogue.z_image_lora import Z_IMAGE_LORA
from ovis_server.model_names import BUILT_IN_NAMES, DEFAULT_MODEL_ID, parse_extra_models

if TYPE_CHECKING:
    from ovis_server.config import Settings

BUILT_IN: tuple[ModelSpec, ...] = (OVIS_IMAGE, Z_IMAGE_TURBO)
# Variants of built-in models (ModelSpec.variant_of): served whenever their model is.
VARIANTS: tuple[ModelSpec, ...] = (Z_IMAGE_EDIT, Z_IMAGE_LORA)
_NAMES = {name for spec in (*BUILT_IN, *VARIANTS) for name in spec.names}
if _NAMES != BUILT_IN_NAMES:  # pragma: no cover (a model added here but not there)
    raise ImportError(
        "the built-in models' names differ from ovis_server.model_names.BUILT_IN_NAMES: "
        f"{sorted(_NAMES ^ BUILT_IN_NAMES)}"
    )
DEFAULT_MODEL = OVIS_IMAGE


class UnknownModelError(ValueError):
    """A model id this deployment does not serve."""


def extra_model(model_id: str, weights: str) -> ModelSpec:
    """An Ovis-Image checkpoint of the operator's (a fine-tune, say) under its own id: the
    same input schema and engine, its own weights."""
    return replace(
        OVIS_IMAGE,
        model_id=model_id,
        display_name=model_id,
        description=f"An Ovis-Image checkpoint served as {model_id}: text-to-image.",
        default_weights=weights,
        owned_by=model_id.partition("/")[0],
        aliases=(),
    )


class ModelRegistry:
    """The served models, in catalogue order, by id and by alias."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        self._aliases: dict[str, ModelSpec] = {}
        for spec in specs:
            for name in spec.names:
                if self.resolve(name) is not None:
                    raise ValueError(f"two models are called {name!r}")
            self._specs[spec.model_id] = spec
            self._aliases.update(dict.fromkeys(spec.aliases, spec))

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        """The models ``--model-id`` serves, among the built-in ones and ``--extra-models``,
        priced at ``--base-price-usd``; UnknownModelError for a name that is neither."""
        extras = [extra_model(*pair) for pair in parse_extra_models(settings.extra_models)]
        known = cls((*BUILT_IN, *extras))
        names = settings.model_ids or (DEFAULT_MODEL_ID, *(spec.model_id for spec in extras))
        served: dict[str, ModelSpec] = {}
        for name in names:
            spec = known.resolve(name)
            if spec is None:
                raise UnknownModelError(
                    f"--model-id {name!r} is not a model of this server; it has "
                    f"{', '.join(known.ids())} (add one with --extra-models ID=WEIGHTS)"
                )
            served.setdefault(spec.model_id, spec)
        for variant in VARIANTS:
            if variant.variant_of in served:
                served.setdefault(variant.model_id, variant)
        return cls(
            replace(spec, base_price_usd=settings.base_price_usd) for spec in served.values()
        )

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def get(self, model_id: str) -> ModelSpec | None:
        """The model with this id, or None."""
        return self._specs.get(model_id)

    def resolve(self, name: str) -> ModelSpec | None:
        """The model with this id or alias, or None."""
        return self._specs.get(name) or self._aliases.get(name)

    def ids(self) -> list[str]:
        return list(self._specs)

    def names(self) -> list[str]:
        """Every id, then every alias: what a ``model`` name may be."""
        return [*self._specs, *self._aliases]

    def served(self, settings: Settings) -> ModelSpec:
        """The first model ``--model-id`` names: the one ``generate`` takes."""
        spec = self.resolve(settings.model_id)
        if spec is None:
            raise UnknownModelError(
                f"--model-id {settings.model_id!r} is not a model of this server; it has "
                f"{', '.join(self._specs)} (add one with --extra-models ID=WEIGHTS)"
            )
        return spec

    def search(
        self, search: str | None = None, category: str | None = None, kind: str | None = None
    ) -> list[ModelSpec]:
        """The entries that pass the filters, in catalogue order."""
        return [spec for spec in self if spec.matches(search, category, kind)]

    def categories(self) -> list[str]:
        """Every category some entry is filed under, sorted."""
        return sorted({category for spec in self for category in spec.categories})
