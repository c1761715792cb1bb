"""A submit's webhook parameters: where its messages go and whether every status change is
one, from the query string or the body, checked against the destination rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ovis_server.webhooks.destinations import url_problem

# Body fields that are webhook parameters, not model input.
WEBHOOK_FIELDS = frozenset({"webhook", "webhook_url", "webhook_intermediate_status"})


class WebhookParamError(ValueError):
    """The submit's webhook parameters are wrong; the message names the field."""


@dataclass(frozen=True)
class Webhook:
    """Where a job's webhooks go: from the submit's query, or else from its body."""

    url: str | None = None
    intermediate: bool | None = None

    def merged(self, body: dict[str, Any]) -> Webhook:
        """Take the webhook fields out of ``body`` and settle what the submit asks for."""
        url = body.pop("webhook", None)
        alias = body.pop("webhook_url", None)  # what some clients call it
        if url is None:
            url = alias
        elif alias is not None and alias != url:
            raise WebhookParamError("webhook_url: differs from webhook; send one")
        intermediate = body.pop("webhook_intermediate_status", None)
        if url is not None and not isinstance(url, str):
            raise WebhookParamError("webhook: must be a URL string")
        if intermediate is not None and not isinstance(intermediate, bool):
            raise WebhookParamError("webhook_intermediate_status: must be a boolean")
        merged = Webhook(
            self.url if self.url is not None else url,
            self.intermediate if self.intermediate is not None else intermediate,
        )
        if merged.url is None and merged.intermediate:
            raise WebhookParamError("webhook_intermediate_status: needs a webhook URL too")
        return merged


def check_webhook_url(url: str, *, allow_private: bool = False) -> None:
    """Refuse at submit what the destination policy refuses from the URL alone."""
    problem = url_problem(url, allow_private=allow_private)
    if problem is not None:
        raise WebhookParamError(f"webhook: {problem}")
