"""Webhooks, the server side: parameters, destination rules, the outbox, sending, signing."""
