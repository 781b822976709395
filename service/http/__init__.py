"""Runs in each HTTP worker process (`python -m service.http.worker`): the FastAPI app, its routes and
schemas' use, reading and decoding uploads, and the worker's client of the engine. Imports no model
(no torch) and nothing from `service.engine`: it reaches the engine only through `service.transport`."""
