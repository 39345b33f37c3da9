"""What a node tells its operators: the Prometheus registry (``metrics``), the plain
HTTP /metrics /healthz /readyz server (``http``) and JSON-lines structured logs
(``logs``). Imports nothing from the rest of liferaft, so every layer may use it."""
