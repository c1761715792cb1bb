"""OpenAI's Images API over the same queue: its wire models (``protocol``), its errors
(``errors``: failures told in OpenAI's shape and codes), the service that makes a
generation's images (``serving``) and the routes (``routes``)."""
