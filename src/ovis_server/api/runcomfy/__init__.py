"""RunComfy's Model API dialect: its wire models (``protocol``), thin route handlers
(``routes``) over the catalogue pages (``catalogue``), taking a submit (``submissions``), a
token's requests (``requests``) and the status and result bodies (``rendering``), and the
status call's short path (``status_path``)."""
