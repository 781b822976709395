"""What one HTTP worker holds while it serves: its engine client, its preprocessing and decode threads, and
its budget of upload bytes. The routes find it on the app (`worker_of`)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from starlette.requests import Request

from service.errors import ServiceError
from service.settings import Settings

from .contract import EngineConnection
from .images import plain_jpeg
from .uploads import ByteBudget, Preprocessor


class Worker:
    """What one HTTP worker owns: the engine client, the preprocessing, the decode threads, the byte budget."""

    def __init__(self, settings: Settings, engine: EngineConnection):
        self.settings = settings
        self.engine = engine
        self.preprocess = Preprocessor(engine.info.preprocess, settings.max_image_pixels)
        self.budget = ByteBudget(settings.max_inflight_bytes)
        self._decode_pool = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="decode")

    async def pixels(self, data: bytes) -> np.ndarray | bytes:
        """Decode and preprocess one upload: small images right here (a hand-off to a thread costs more
        than their decoding), larger ones on the decode threads (Pillow releases the GIL there). With
        decode=engine a plain JPEG, its header checked, is returned as it is: the engine decodes it."""
        image = self.preprocess.open(data)
        if self.settings.decode == "engine" and plain_jpeg(image):
            return data
        if self.preprocess.quick(image):
            return self.preprocess.finish(image)
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, self.preprocess.finish, image)

    async def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        await self.engine.close()


def worker_of(request: Request) -> Worker:
    """The request's worker, or 503 while the app starts or stops."""
    worker = request.app.state.worker
    if worker is None:
        raise ServiceError(503, "not_running", "the service is starting or stopping", {"Retry-After": "1"})
    return worker
