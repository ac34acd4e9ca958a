"""Scripts run inside each client's own environment: they import the client, never diffship."""
