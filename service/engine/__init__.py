"""Runs in the engine process (`python -m service.engine.loop`): the one owner of the frozen CLIP, its
prompt sets and the batching loop. Imports nothing from `service.http`: the workers reach it only
through `service.transport`."""
