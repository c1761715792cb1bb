"""What one served model is: its catalogue entry, its input schema, how a worker loads it,
which of its jobs share a batched call, and its price."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

from pydantic import BaseModel

from ovis_server.engine.request import GenerationRequest

if TYPE_CHECKING:
    import threading

    from ovis_server.config import Settings
    from ovis_server.engine.pipeline import Engine
    from ovis_server.engine.weights import PhaseReport

ModelKind = Literal["model", "workflow", "inference"]
# How a worker builds the engine of a model: (weights as --model takes them, settings).
EngineFactory = Callable[[str, "Settings"], "Engine"]

OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "format": "uri", "description": "The generated image."},
        "images": {
            "type": "array",
            "description": "The generated images.",
            "items": {"type": "string", "format": "uri"},
        },
        "video": {"type": "string", "format": "uri", "description": "A generated video."},
        "videos": {
            "type": "array",
            "description": "Generated videos.",
            "items": {"type": "string", "format": "uri"},
        },
    },
}


def load_family_engine(family: str, weights: str, settings: Settings) -> Engine:
    """The engine of a model of ``family`` on ``weights`` (a directory, or random-full),
    placed and optimised as ``settings`` say: what each spec's engine factory does."""
    from ovis_server.engine.pipeline import Engine

    return Engine.load(
        weights,
        device=settings.device,
        dtype=settings.dtype,
        compile=settings.compile_flag,
        fp8=settings.fp8,
        memory=settings.memory,
        gpu_memory=settings.gpu_memory_bytes,
        compile_dynamic=settings.compile_dynamic,
        family=family,
        lora_hotswap_rank=settings.lora_hotswap_rank,
    )


def field_problems(errors: Iterable[Mapping[str, Any]], empty: str = "body") -> list[str]:
    """Pydantic's errors as "field.path: message" lines (``empty`` names a field-less one)."""
    return [
        f"{'.'.join(str(part) for part in error.get('loc', ())) or empty}: {error['msg']}"
        for error in errors
    ]


@dataclass(frozen=True)
class ImageSizes:
    """The image sizes a model makes: sides that are multiples of ``multiple`` from
    ``min_side`` to ``max_side``, and its named presets (width, height)."""

    multiple: int
    min_side: int
    max_side: int
    presets: Mapping[str, tuple[int, int]]


class ModelInput(BaseModel):
    """A model's input schema: the wire fields clients send, and what the server needs of
    them (the seed to report, the request the engine runs)."""

    # The fields that name an input image (an https URL or a data URI).
    IMAGE_FIELDS: ClassVar[tuple[str, ...]] = ()
    # The image sizes its image_size takes; None for a model that makes no images.
    SIZES: ClassVar[ImageSizes | None] = None

    @abstractmethod
    def resolved_seed(self) -> int:
        """The seed asked for, or a random one to use and report back."""

    @abstractmethod
    def to_generation_request(self, seed: int) -> GenerationRequest:
        """The engine's view of this input, with the seed resolved."""

    def image_urls(self) -> dict[str, str]:
        """The fields that name an input image still to fetch, and their values (none for
        a model without image inputs)."""
        return {}

    def with_input_image(self, width: int, height: int) -> Self:
        """This input once its image (``width`` x ``height``) is stored."""
        return self

    def lora_paths(self) -> list[str]:
        """The LoRA paths the request names (none for a model without LoRAs): the API
        judges them at submit."""
        return []

    def reads_input_image(self) -> bool:
        """Whether the job runs on an input image that the API stored (the worker reads
        it from the file store)."""
        return False


@dataclass(frozen=True)
class ModelSpec:
    """One served model: everything the API, the worker and the CLI know of it."""

    model_id: str
    display_name: str
    description: str
    input_model: type[ModelInput]
    # What the worker loads unless --model says otherwise: a hub id, a directory, tiny...
    default_weights: str
    engine_factory: EngineFactory
    # Capabilities, as RunComfy's catalogue files models: "text-to-image", ...
    categories: tuple[str, ...] = ()
    # Per output image: the catalogue's base_price_usd and each result's cost.
    base_price_usd: float = 0.0
    kind: ModelKind = "model"
    owned_by: str = ""
    # When the entry was added (unix seconds): OpenAI's model list reports it.
    created: int = 0
    # Short names that OpenAI-style clients may send as ``model``.
    aliases: tuple[str, ...] = ()
    output_schema: Mapping[str, Any] = field(default_factory=lambda: OUTPUT_SCHEMA)
    # The model family the engine runs it as (engine/families/: "ovis-image", "z-image"):
    # what --model tiny and random-full build for it.
    family: str = "ovis-image"
    # A variant of another model (its "/image-to-image", "/lora"): served with it, from its
    # weights, by its workers; None for a model of its own.
    variant_of: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """What it is called: its id and its aliases (``--model``'s per-model form)."""
        return (self.model_id, *self.aliases)

    @property
    def base_model_id(self) -> str:
        """The model whose weights and engine it runs on: its own id, or a variant's model."""
        return self.variant_of or self.model_id

    @property
    def takes_images(self) -> bool:
        """Whether its input has image fields (bodies may be larger: data URIs)."""
        return bool(self.input_model.IMAGE_FIELDS)

    @property
    def takes_loras(self) -> bool:
        """Whether its input has a ``loras`` field (its LoRA variant's does)."""
        return "loras" in self.input_model.model_fields

    @property
    def sizes(self) -> ImageSizes | None:
        """The image sizes it makes (presets, bounds, multiple), or None."""
        return self.input_model.SIZES

    def input_schema(self) -> dict[str, Any]:
        return self.input_model.model_json_schema()

    def matches(self, search: str | None, category: str | None, kind: str | None) -> bool:
        """Whether this entry passes the catalogue filters of ``GET /v1/models``."""
        if kind is not None and kind != self.kind:
            return False
        if category and category.strip().lower() not in self.categories:
            return False
        if search:
            needle = search.strip().lower()
            haystack = (self.model_id, self.display_name, self.description)
            return any(needle in text.lower() for text in haystack)
        return True

    def batch_key(self, request: GenerationRequest) -> str:
        """Jobs with equal keys run in one batched call: the same model, and the same
        size, steps and guidance (``GenerationRequest.batch_shape``)."""
        return f"{self.model_id}:{request.batch_shape()}"

    def weights(self, settings: Settings) -> str:
        """What a worker serving this model loads: ``--model``, else the default weights."""
        return settings.model or self.default_weights

    def load_engine(
        self,
        settings: Settings,
        report: PhaseReport | None = None,
        stop: threading.Event | None = None,
    ) -> Engine:
        """The engine of this model, as ``settings`` say (the worker's and ``generate``'s).
        Weights named by a hub id are downloaded first if the cache lacks them, with progress
        in the log and in ``report`` (phase downloading); ``stop`` interrupts the download."""
        from ovis_server.engine.download import local_weights

        weights = local_weights(
            self.weights(settings), settings.data_dir, report=report, stop=stop, family=self.family
        )
        engine = self.engine_factory(weights, settings)
        engine.loras.model_id = self.base_model_id  # named in a LoRA mismatch's message
        return engine
