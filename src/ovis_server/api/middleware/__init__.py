"""The HTTP edge: pure ASGI middleware, one a module, that judge what a client sends and
holds open before any route parses (they see the raw byte stream, so nothing is buffered
to judge it), the security headers on every response, and the access log's redaction."""
