"""Model hosting for the service: loading, admission (a bounded queue), 2D micro-batching, 3D jobs, timeouts.

Runs on the server's event loop; forward passes run in a small thread pool (workers) so the loop keeps answering
health probes and refusing excess requests while the CPU is busy. Per 2D model one batcher task takes the first
waiting request, collects more for up to batch_wait_ms (or batch_size requests) and runs them together (ServeConfig).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import predictors
from .config import ServeConfig
from .inputs import (
    RequestError,
    Upload,
    assign_modalities,
    check_image,
    check_volumes,
    save_uploads,
)
from .view import view_payload

log = logging.getLogger(__name__)


@dataclass
class _Item:
    image: np.ndarray
    future: asyncio.Future = field(repr=False)


@dataclass
class _Model:
    source: predictors.ModelSource
    info: dict[str, Any]
    postprocess: predictors.PostProcess  # what its label maps get, resolved and checked once when the engine is made
    hosted: predictors.Hosted2D | predictors.Hosted3D | None = None
    queue: asyncio.Queue | None = None
    error: str | None = None


class Engine:
    """The hosted models and the machinery between a request and a forward pass."""

    def __init__(self, config: ServeConfig):
        self.config = config
        predictors.check_runtime(config.runtime)
        given = predictors.read_postprocess(config.postprocess)  # None: each model's own choice
        sources = predictors.resolve_models(config.models, config.runtime)
        self.models = {}
        for source in sources:  # an option that does not fit a model fails here, before any weights load
            applied = predictors.postprocess_for(source, given)
            mirror = [0, 1, 2] if source.dims == 3 and config.mirror_3d else []  # 2D: never (ServeConfig)
            info = predictors.describe(source) | {"postprocess": applied.spelling(), "mirror_axes": mirror}
            info["precision"] = "exported" if source.exported else config.precision  # onnxruntime: as exported
            info["threshold"] = predictors.threshold_for(source)
            self.models[source.name] = _Model(source, info, applied)
        self._pending = 0
        self._pending_3d = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pool_3d: ThreadPoolExecutor | None = None
        self._tasks: list[asyncio.Task] = []
        self._loaded = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and all(m.hosted is not None for m in self.models.values())

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "queued_2d": self._pending,
            "queued_3d": self._pending_3d,
            "errors": {n: m.error for n, m in self.models.items() if m.error},
        }

    async def start(self) -> None:
        """Start the pools and load the weights in the background; ready turns true once all are loaded."""
        self._pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="rwkvseg-serve")
        self._pool_3d = ThreadPoolExecutor(self.config.workers_3d, thread_name_prefix="rwkvseg-serve-3d")
        self._tasks.append(asyncio.create_task(self._load_all()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in (self._pool, self._pool_3d):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        await asyncio.wait_for(self._loaded.wait(), timeout)
        return self.ready

    async def _load_all(self) -> None:
        loop = asyncio.get_running_loop()
        c = self.config
        for name, model in self.models.items():
            started = time.perf_counter()
            try:
                model.hosted = await loop.run_in_executor(
                    self._pool,
                    predictors.load,
                    model.source,
                    c.device,
                    c.overlap_3d,
                    c.mirror_3d,
                    c.torch_threads,
                    model.postprocess,
                    c.precision,
                )
            except Exception as err:  # a model that cannot load keeps the service unready, with the reason
                model.error = f"{type(err).__name__}: {err}"
                log.error("model %s failed to load: %s", name, model.error)
                continue
            if model.hosted.dims == 2:
                model.queue = asyncio.Queue()
                self._tasks.append(asyncio.create_task(self._batch_loop(model)))
            log.info("loaded model %s in %.0f ms", name, 1000 * (time.perf_counter() - started))
        self._loaded.set()

    def model(self, name: str, dims: int | None = None) -> _Model:
        model = self.models.get(name)
        if model is None:
            raise RequestError(404, f"unknown model {name!r}; hosted models: {', '.join(self.models)} (GET /v1/models)")
        if model.hosted is None:
            reason = f"it failed to load: {model.error}" if model.error else "it is still loading, retry shortly"
            raise RequestError(503, f"model {name!r} is not ready ({reason})", {"Retry-After": "2"})
        if dims is not None and model.hosted.dims != dims:
            raise RequestError(400, f"model {name!r} is {model.hosted.dims}D; this route serves {dims}D models")
        return model

    @contextmanager
    def _admit(self, three_d: bool):
        limit = self.config.max_queue_3d if three_d else self.config.max_queue
        pending = self._pending_3d if three_d else self._pending
        if pending >= limit:
            raise RequestError(
                503, f"the service is at its limit of {limit} queued requests; retry later", {"Retry-After": "1"}
            )
        if three_d:
            self._pending_3d += 1
        else:
            self._pending += 1
        try:
            yield
        finally:
            if three_d:
                self._pending_3d -= 1
            else:
                self._pending -= 1

    async def _timed(self, coro, timeout: float):
        try:
            async with asyncio.timeout(timeout):
                return await coro
        except TimeoutError:
            raise RequestError(
                504, f"the prediction took longer than {timeout:g} s; retry later or send less"
            ) from None

    # 2D

    async def predict_2d(
        self, name: str, upload: Upload, threshold: float | None, with_overlay: bool, probabilities: bool = False
    ) -> bytes:
        """The mask (or overlay) PNG of one uploaded image, at the image's size; threshold None: the model's own
        (GET /v1/models). probabilities: the model's probabilities instead (Hosted2D.probabilities_file)."""
        model = self.model(name, dims=2)
        threshold = model.info["threshold"] if threshold is None else threshold
        hosted: predictors.Hosted2D = model.hosted
        with self._admit(three_d=False):
            return await self._timed(
                self._run_2d(model, hosted, upload, threshold, with_overlay, probabilities), self.config.timeout_s
            )

    async def _run_2d(
        self, model: _Model, hosted: predictors.Hosted2D, upload: Upload, threshold, with_overlay, probabilities
    ):
        loop = asyncio.get_running_loop()
        image = await asyncio.to_thread(self._decode, hosted, upload)
        item = _Item(image, loop.create_future())
        await model.queue.put(item)
        probs = await item.future

        def encode() -> bytes:
            if probabilities:
                return hosted.probabilities_file(probs)
            labels = hosted.labels(probs, threshold)
            return hosted.overlay_png(image, labels) if with_overlay else hosted.mask_png(labels)

        return await asyncio.to_thread(encode)

    def _decode(self, hosted: predictors.Hosted2D, upload: Upload) -> np.ndarray:
        check_image(upload, self.config.max_image_pixels)
        with tempfile.TemporaryDirectory(prefix="rwkvseg-serve-") as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(upload.data)
            try:
                return hosted.read(path)
            except (ValueError, OSError) as err:
                message = str(err).replace(str(path), repr(upload.filename))
                raise RequestError(400, f"cannot use the image: {message}") from None

    async def _batch_loop(self, model: _Model) -> None:
        loop = asyncio.get_running_loop()
        hosted: predictors.Hosted2D = model.hosted
        wait = self.config.batch_wait_ms / 1000
        while True:
            batch = [await model.queue.get()]
            deadline = loop.time() + wait
            while len(batch) < self.config.batch_size:
                try:
                    batch.append(model.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(model.queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [item for item in batch if not item.future.done()]  # timed-out requests left the queue
            if not batch:
                continue
            try:
                probs = await loop.run_in_executor(self._pool, hosted.probabilities, [i.image for i in batch])
            except Exception as err:
                log.exception("forward pass of model %s failed", model.source.name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            for item, prob in zip(batch, probs, strict=True):
                if not item.future.done():
                    item.future.set_result(prob)

    # 3D

    async def predict_3d(
        self,
        name: str,
        uploads: list[Upload],
        view: bool = False,
        background: str | None = None,
        probabilities: bool = False,
    ):
        """NIfTI (.nii.gz bytes) of the case's labels on its own grid, or of its probabilities (4-D, 8-bit) with
        probabilities, or the viewer's JSON when view."""
        model = self.model(name, dims=3)
        hosted: predictors.Hosted3D = model.hosted
        with self._admit(three_d=True):
            return await self._timed(
                self._run_3d(hosted, uploads, view, background, probabilities), self.config.timeout_3d_s
            )

    async def _run_3d(self, hosted: predictors.Hosted3D, uploads, view, background, probabilities=False):
        loop = asyncio.get_running_loop()
        tmp = tempfile.TemporaryDirectory(prefix="rwkvseg-serve-3d-", ignore_cleanup_errors=True)
        try:
            folder = Path(tmp.name)
            inputs = folder / "in"
            inputs.mkdir()
            files = await asyncio.to_thread(self._prepare_case, hosted, uploads, inputs)
            prediction = await loop.run_in_executor(
                self._pool_3d, self._predict_case, hosted, files, folder, probabilities
            )
            if probabilities:
                return prediction.probabilities_gz
            if not view:
                return prediction.nifti_gz
            return await asyncio.to_thread(view_payload, hosted, prediction, files, background)
        finally:
            # the worker may still run after a timeout; it then fails on the missing files, harmlessly
            tmp.cleanup()

    def _prepare_case(self, hosted: predictors.Hosted3D, uploads: list[Upload], dest: Path) -> list[Path]:
        paths = save_uploads(uploads, dest, self.config.max_unpacked_bytes)
        files = assign_modalities(paths, hosted.modalities, hosted.separator)
        check_volumes(files, self.config.max_case_voxels)
        return files

    @staticmethod
    def _predict_case(
        hosted: predictors.Hosted3D, files: list[Path], folder: Path, probabilities: bool = False
    ) -> predictors.Prediction3D:
        try:
            return hosted.predict(files, folder, probabilities=probabilities)
        except (ValueError, OSError, EOFError, zlib.error) as err:
            # reading the volumes is where these arise: truncated gzip, grids that differ between modalities
            message = str(err).replace(f"{folder}/in/", "")
            raise RequestError(422, f"cannot predict this case: {message}") from None
