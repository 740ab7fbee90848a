"""The HTTP service: `create_app(config)` builds the FastAPI app, `serve(config)` runs it under uvicorn.

Routes (the OpenAPI page at /docs documents each with its answers):
  GET  /v2/health/live, /v2/health/ready   Open Inference Protocol health probes
  GET  /v2/models/{name}/ready             Open Inference Protocol model readiness
  GET  /v1/models                          hosted models: dims, inputs, classes
  POST /v1/models/{name}/predict           multipart field `file` -> image/png mask (2D) or application/gzip NIfTI (3D);
                                           ?overlay=true (2D), ?probabilities=true: the model's probabilities instead
  POST /v1/models/{name}/view              3D only: the viewer's JSON (label and image volumes, region volumes in ml)
  GET  /                                   the web viewer (static files in this package, no CDN)
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .engine import Engine
from .inputs import RequestError, Upload

access_log = logging.getLogger("rwkvseg.serve.access")
log = logging.getLogger(__name__)

MAX_FILES = 16

DESCRIPTION = """
Segmentation masks from rwkvseg models over HTTP.

* **2D** (`dims: 2`): POST one PNG / JPEG image in the multipart field `file`; the answer is the mask as
  `image/png` at the input's size (binary: 0/255; multi-class: the class index as grey value), or with
  `overlay=true` the image with the mask tinted. `threshold` (binary models) moves the cut on the probability
  (default: the one the model records, listed under `threshold` in `GET /v1/models`).
* **3D** (`dims: 3`): POST the case's NIfTI files, one per modality named `<case>_<modality>.nii.gz` (e.g. BraTS
  `_t1`, `_t1ce`, `_t2`, `_flair`), either as one zip in `file` or as several `file` parts. A single 4-D NIfTI is
  refused: its channel order cannot be checked. The answer is the label volume as gzip NIfTI (`application/gzip`)
  with the input's header and affine.

Limits: requests above the size limit get 413; when the queue is full, 503 with `Retry-After`; a prediction past
the timeout, 504. Refused inputs get a 4xx whose `detail` says what to send instead. No request is unpickled.
"""

ERRORS = {
    400: {"description": "malformed input (truncated image, unsafe or broken zip, wrong number of files)"},
    404: {"description": "unknown model; `detail` lists the hosted ones"},
    413: {"description": "request, image or volume larger than the service's limits"},
    415: {"description": "not an image / NIfTI / zip"},
    422: {"description": "well-formed but unusable input (missing modality, 4-D NIfTI, bad query value)"},
    503: {"description": "queue full or model not loaded yet; retry after `Retry-After` seconds"},
    504: {"description": "the prediction took longer than the timeout"},
}


class ModelEntry(BaseModel):
    """One hosted model as GET /v1/models lists it."""

    name: str = Field(description="the name in /v1/models/{name}/predict")
    architecture: str
    released: bool = Field(description="shipped with the package, or exported from such a model (else the user's)")
    runtime: str = Field(description="torch (a checkpoint), or onnx (onnxruntime on an exported .onnx file)")
    dims: int = Field(description="2: images; 3: volumes of one or more modalities")
    input: dict[str, Any] = Field(
        description="2D: channels, network size, resize mode, normalization, formats, size protocol; "
        "3D: modalities in order, file naming, formats, target spacing (mm), size protocol"
    )
    classes: dict[str, Any] = Field(description="2D: num_classes, names; 3D: label_values, names, regions")
    output: str = Field(description="the content type and meaning of the predict answer")
    probabilities: str = Field(
        description="the content type and meaning of the predict answer with ?probabilities=true (the model's raw "
        "probabilities, as `rwkvseg predict --probabilities` writes them)"
    )
    postprocess: str = Field(
        description="what the label maps get before they are answered, as `rwkvseg predict --postprocess` spells it "
        "(none, largest, fill-holes, et-min-mm3=V, ...): the service's --postprocess, else the model's own choice"
    )
    mirror_axes: list[int] = Field(
        description="the axes whose flips the logits are averaged over (test-time augmentation): 3D with the "
        "service's --mirror-3d, never in 2D (a model's recorded flips, which `rwkvseg predict` applies, are skipped "
        "for latency: predict with --mirror-axes '' gives the service's masks)"
    )
    precision: str = Field(
        description="the arithmetic of the forward pass: fp32, or bf16 (bfloat16 autocast, the service's "
        "--precision) for checkpoints; exported for an exported file, which runs in onnxruntime as it was exported "
        "(float32 or int8)"
    )
    threshold: float | None = Field(
        description="the probability cut applied, as `rwkvseg predict` applies it: 2D binary models' when a request "
        "names none, 3D region models' cut of each region's sigmoid (the one the model records, else 0.5); null "
        "for multi-class and 3D label models (argmax)"
    )
    ready: bool


class ModelList(BaseModel):
    models: list[ModelEntry]


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields of the record."""

    _standard = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry |= {k: v for k, v in record.__dict__.items() if k not in self._standard}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _GuardAndLog:
    """ASGI middleware: refuses bodies above max_bytes (413, also for chunked uploads) and logs every request."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state = {"status": 500, "sent": False, "bytes": 0}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                state["status"], state["sent"] = message["status"], True
            await send(message)

        async def receive_counted():
            message = await receive()
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > self.max_bytes:
                    raise StarletteHTTPException(413, self._too_large())
            return message

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                status = 413 if length.isdigit() else 400
                detail = self._too_large() if length.isdigit() else "invalid Content-Length header"
                await JSONResponse({"detail": detail}, status)(scope, receive, send_logged)
                return
            await self.app(scope, receive_counted, send_logged)
        except StarletteHTTPException as err:  # raised by receive_counted outside a FastAPI route
            if not state["sent"]:
                await JSONResponse({"detail": err.detail}, err.status_code)(scope, receive, send_logged)
        finally:
            route = scope.get("route")
            access_log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "route": getattr(route, "path", scope["path"]),
                    "model": scope.get("path_params", {}).get("name"),
                    "status": state["status"],
                    "ms": round(1000 * (time.perf_counter() - started), 2),
                    "bytes_in": state["bytes"],
                },
            )

    def _too_large(self) -> str:
        return f"the request is larger than this service's limit of {self.max_bytes} bytes; send a smaller file"


def _static_dir() -> Path:
    return Path(str(resources.files("rwkvseg.serve") / "static"))


async def _uploads(files: list[UploadFile]) -> list[Upload]:
    if len(files) > MAX_FILES:
        raise RequestError(400, f"{len(files)} files sent; send at most {MAX_FILES} (one per modality)")
    return [Upload(f.filename or "upload", await f.read()) for f in files]


def create_app(config: ServeConfig) -> FastAPI:
    """The service as an ASGI app; checkpoints are checked now, weights load in the background at startup."""
    engine = Engine(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(
        title="rwkvseg inference service",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "health", "description": "Open Inference Protocol health routes"},
            {"name": "models", "description": "hosted models and predictions"},
        ],
    )
    app.state.engine = engine
    app.state.config = config

    @app.exception_handler(RequestError)
    async def _refused(request: Request, err: RequestError):
        return JSONResponse({"detail": err.message}, err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            if where == "file" and e.get("type") == "missing":
                problems.append("no file: send the input as multipart/form-data in the field 'file'")
            else:
                problems.append(f"{where}: {e.get('msg')}")
        return JSONResponse({"detail": "; ".join(problems)}, 422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error; the service log has the details"}, 500)

    @app.get("/v2/health/live", tags=["health"], summary="the process answers")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        tags=["health"],
        summary="every hosted model is loaded",
        responses={503: {"description": "still loading, or a model failed to load"}},
    )
    async def ready():
        status = engine.status()
        return JSONResponse(status, 200 if status["ready"] else 503)

    @app.get("/v1/models", tags=["models"], summary="hosted models: names, dims, inputs, classes")
    async def models() -> ModelList:
        return ModelList(models=[ModelEntry(**m.info, ready=m.hosted is not None) for m in engine.models.values()])

    @app.get(
        "/v2/models/{name}/ready",
        tags=["health"],
        summary="one model is loaded (Open Inference Protocol model readiness)",
        responses={404: ERRORS[404], 503: {"description": "the model is still loading or failed to load"}},
    )
    async def model_ready(name: str) -> dict[str, Any]:
        engine.model(name)  # 404 unknown, 503 not loaded
        return {"name": name, "ready": True}

    @app.post(
        "/v1/models/{name}/predict",
        tags=["models"],
        summary="segment one image (2D) or one case (3D); answers with the mask itself",
        response_class=Response,
        responses={
            200: {
                "description": "2D: the mask (or overlay, or probability) PNG at the input's size, or a multi-class "
                "model's probabilities as .npy; 3D: gzip NIfTI on the input grid (labels, or 4-D probabilities)",
                "content": {"image/png": {}, "application/gzip": {}, "application/x-npy": {}},
            },
            **ERRORS,
        },
    )
    async def predict(
        name: str,
        file: Annotated[list[UploadFile], File(description="2D: one image; 3D: a zip, or one NIfTI per modality")],
        overlay: Annotated[bool, Query(description="2D: the image with the mask tinted instead of the mask")] = False,
        threshold: Annotated[
            float | None,
            Query(ge=0.0, le=1.0, description="2D binary models: probability cut (default: the model's own)"),
        ] = None,
        probabilities: Annotated[
            bool,
            Query(
                description="the model's probabilities instead of the mask, as `rwkvseg predict --probabilities` "
                "writes them: 2D an 8-bit PNG (binary models) or float16 .npy [K, H, W]; 3D a 4-D 8-bit NIfTI, "
                "one channel per region or class"
            ),
        ] = False,
    ) -> Response:
        model = engine.model(name)
        if overlay and probabilities:
            raise RequestError(422, "overlay and probabilities: ask for one of them per request")
        if overlay and model.hosted.dims == 3:
            raise RequestError(422, f"overlay: for 2D models, and {name!r} is 3D (try /v1/models/{name}/view)")
        uploads = await _uploads(file)
        if model.hosted.dims == 3:
            data = await engine.predict_3d(name, uploads, probabilities=probabilities)
            what = "probabilities" if probabilities else "seg"
            headers = {"Content-Disposition": f'attachment; filename="{name}_{what}.nii.gz"'}
            return Response(data, media_type="application/gzip", headers=headers)
        if len(uploads) != 1:
            raise RequestError(400, f"model {name!r} is 2D: send exactly one image in the field 'file'")
        data = await engine.predict_2d(name, uploads[0], threshold, overlay, probabilities)
        return Response(data, media_type=model.hosted.probabilities_type if probabilities else "image/png")

    @app.post(
        "/v1/models/{name}/view",
        tags=["models"],
        summary="3D: the viewer's JSON (volumes as base64 bytes, RAS order, spacing, region volumes in ml)",
        responses=ERRORS,
    )
    async def view(
        name: str,
        file: Annotated[list[UploadFile], File(description="a zip, or one NIfTI per modality")],
        background: Annotated[str | None, Query(description="modality shown under the labels")] = None,
    ) -> dict[str, Any]:
        engine.model(name, dims=3)
        return await engine.predict_3d(name, await _uploads(file), view=True, background=background)

    static = _static_dir()
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static / "index.html")

    app.add_middleware(_GuardAndLog, max_bytes=config.max_request_bytes)
    return app


def log_config(json_lines: bool) -> dict[str, Any]:
    """logging.config dict for the service process: every logger (uvicorn's too) as JSON lines on stderr."""
    formatter = {"()": f"{__name__}.JsonFormatter"} if json_lines else {"format": "%(asctime)s %(name)s %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


def serve(config: ServeConfig) -> None:
    """Run the service in this process until interrupted (the body of `rwkvseg serve`)."""
    import uvicorn
    from PIL import Image

    # the process-wide Pillow guard; the service also checks every image's size before decoding it
    Image.MAX_IMAGE_PIXELS = config.max_image_pixels
    if config.torch_threads is not None:
        import torch

        torch.set_num_threads(config.torch_threads)
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_config=log_config(config.log_json),
        access_log=False,
        limit_concurrency=config.max_queue + config.max_queue_3d + 32,
    )
