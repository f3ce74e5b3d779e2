"""The decision mesh: pure decision engine, authenticated ingest, durable store, HTTP API."""
