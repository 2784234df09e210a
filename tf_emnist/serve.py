"""`tf-emnist serve`: TensorFlow Serving's REST API, image uploads and a drawing pad, with request batching.

Needs the serve extra (Starlette, uvicorn): the command line imports this module only to serve.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from importlib import resources

import numpy as np
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tf_emnist.predict import ImageError, characters_in, describe, read_image
from tf_emnist.predict import DEFAULT_TOP_K
from tf_emnist.predict import top_k as ranked

log = logging.getLogger("tf_emnist")

MAX_BODY = 10 * 1024 * 1024  # bytes of one request
MAX_INSTANCES = 1024  # images of one :predict request
BUCKETS = (1, 4, 16, 64)  # batch sizes the model is compiled for; a batch is padded to the next one
SIGNATURES = ("serving_default", "serve_stored")  # stored: the NIST/tfds orientation
OUTPUTS = ("characters", "class_ids", "logits", "probabilities")


class RequestError(ValueError):
    """A request the server refuses: its HTTP status and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ServedModel:
    """A model as `serve` runs it: uint8 upright [N, 28, 28] -> logits, one call at a time.

    A SavedModel's signature is compiled with XLA in this process with `xla` (the file on
    disk stays portable). Batches run in chunks of at most `max_batch` images, each padded
    to one of a few sizes (BUCKETS), all compiled before the first request, so no request
    waits for a compilation. TFLite exports run as they are. One call at a time.
    """

    def __init__(self, path: str, name: str | None = None, xla: bool = True, max_batch: int = 64):
        from tf_emnist.sources import load_source

        source = load_source(path)
        self.path, self.task, self.source = path, source.task, source
        self.name = name or source.task.name
        self.version, self.class_names, self.metrics = source.version, source.class_names, source.metrics
        self.members, self.kind = source.members, source.kind
        self._lock = threading.Lock()
        self._logits = source.logits_function(xla)
        self.buckets = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        log.info("loading %s%s for batches of %s images", path, " (compiled with XLA)" if xla else "",
                 ", ".join(map(str, self.buckets)))
        for size in self.buckets:  # load and compile before the first request
            self._logits(np.zeros((size, 28, 28), np.uint8))

    def logits(self, images: np.ndarray) -> np.ndarray:
        chunks = [images[i: i + self.buckets[-1]] for i in range(0, len(images), self.buckets[-1])]
        return np.concatenate([self._chunk_logits(chunk) for chunk in chunks])

    def _chunk_logits(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        size = next(b for b in self.buckets if b >= n)
        if size != n:
            images = np.concatenate([images, np.zeros((size - n, 28, 28), np.uint8)])
        with self._lock:
            return np.asarray(self._logits(images))[:n]

    def outputs(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        from tf_emnist.sources import outputs

        return outputs(logits, self.class_names)


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future


class Batcher:
    """Gathers concurrent requests into one model call: up to max_batch_size images, waiting at most
    timeout_ms for more after the first (as TensorFlow Serving's batching does)."""

    def __init__(self, model: ServedModel, max_batch_size: int = 64, timeout_ms: float = 2.0):
        self.model, self.max_batch_size, self.timeout = model, max_batch_size, timeout_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def logits(self, images: np.ndarray) -> np.ndarray:
        if self.max_batch_size <= 1 or self.queue is None:
            return await asyncio.to_thread(self.model.logits, images)
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(images, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size, deadline = len(batch[0].images), loop.time() + self.timeout
            while size < self.max_batch_size:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
                batch.append(item)
                size += len(item.images)
            try:
                logits = await asyncio.to_thread(self.model.logits, np.concatenate([p.images for p in batch]))
            except Exception as e:  # the model failed: every waiting request learns why
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(e)
                continue
            start = 0
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_result(logits[start: start + len(pending.images)])
                start += len(pending.images)


def parse_predict_request(body: bytes) -> tuple[np.ndarray, str, bool]:
    """A TF Serving :predict body -> (uint8 upright images, signature name, row format?)."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(f"the request body is not valid JSON ({e.__class__.__name__}); "
                           'send {"instances": [...]} or {"inputs": ...}') from None
    if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
        raise RequestError('the request must be a JSON object with exactly one of "instances" (row format) '
                           'or "inputs" (columnar format)')
    signature = request.get("signature_name") or "serving_default"
    if signature not in SIGNATURES:
        raise RequestError(f"unknown signature_name {signature!r}; this model has {', '.join(SIGNATURES)}")
    row = "instances" in request
    data = request["instances"] if row else request["inputs"]
    if row and isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        data = [d.get("images") for d in data]  # named inputs: [{"images": ...}, ...]
    if isinstance(data, dict):
        data = data.get("images")
    images = _as_images(data)
    if signature == "serve_stored":
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    return images, signature, row


def _as_images(data) -> np.ndarray:
    if data is None:
        raise RequestError('the input is missing; send images as "images" or as a list of 28x28 arrays')
    try:
        array = np.asarray(data)
    except ValueError:
        raise RequestError("the images are ragged; each instance must be a 28x28 array of integers 0-255") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (28, 28) or len(array) == 0:
        raise RequestError(f"expected 28x28 images (shape [N, 28, 28]), got shape {list(array.shape)}")
    if len(array) > MAX_INSTANCES:
        raise RequestError(f"{len(array)} instances in one request; send at most {MAX_INSTANCES}", 413)
    if array.dtype.kind not in "iu" and not (array.dtype.kind == "f" and np.all(array == np.round(array))):
        raise RequestError(f"expected integers 0-255 (uint8 images), got {array.dtype} values")
    if array.min() < 0 or array.max() > 255:
        raise RequestError("pixel values must lie in 0-255 (uint8 images)")
    return array.astype(np.uint8)


def format_outputs(outputs: dict[str, np.ndarray], row: bool) -> dict:
    """TF Serving's answer: {"predictions": [one object per image]} or {"outputs": {name: values}}."""
    as_lists = {name: outputs[name].tolist() for name in OUTPUTS}
    if row:
        return {"predictions": [{name: as_lists[name][i] for name in OUTPUTS} for i in range(len(outputs["class_ids"]))]}
    return {"outputs": as_lists}


def signature_metadata(model: ServedModel) -> dict:
    """GET /v1/models/NAME/metadata, in TF Serving's shape."""
    def tensor(name, dtype, *dims):
        return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in dims],
                                                 "unknown_rank": False}, "name": name}

    classes = len(model.class_names)
    outputs = {"characters": tensor("StatefulPartitionedCall:0", "DT_STRING", -1),
               "class_ids": tensor("StatefulPartitionedCall:1", "DT_INT32", -1),
               "logits": tensor("StatefulPartitionedCall:2", "DT_FLOAT", -1, classes),
               "probabilities": tensor("StatefulPartitionedCall:3", "DT_FLOAT", -1, classes)}
    signatures = {name: {"inputs": {"images": tensor(f"{name}_images:0", "DT_UINT8", -1, 28, 28)},
                         "outputs": outputs, "method_name": "tensorflow/serving/predict"} for name in SIGNATURES}
    return {"model_spec": {"name": model.name, "signature_name": "", "version": str(model.version)},
            "metadata": {"signature_def": {"signature_def": signatures,
                                           "@type": "type.googleapis.com/tensorflow.serving.SignatureDefMap"}}}


def page(model: ServedModel) -> str:
    """The drawing pad, naming the model and its test accuracy."""
    import html

    accuracy = model.metrics.get("test_accuracy")
    about = (f"{model.name} v{model.version} ({model.kind}"
             + (f", {model.members} models averaged" if model.members > 1 else "")
             + (f", {accuracy:.2%} test accuracy on EMNIST ByMerge" if accuracy else "") + ")")
    text = resources.files("tf_emnist").joinpath("static/index.html").read_text()
    return text.replace("{{MODEL}}", html.escape(about)).replace("{{NAME}}", html.escape(model.name))


# -- the handlers: the app's state holds the model and its batcher (create_app)

def _servable(request) -> ServedModel:
    """The model a /v1/models/NAME[/versions/N] path names, or a 404 as TF Serving words it."""
    model = request.app.state.model
    name, version = request.path_params["name"], request.path_params.get("version")
    if name != model.name:
        raise RequestError(f"Servable not found for request: Latest({name}); this server has {model.name!r}", 404)
    if version is not None and version != model.version:
        raise RequestError(f"Servable not found for request: Specific({name}, {version}); "
                           f"the version served is {model.version}", 404)
    return model


async def model_status(request):
    """GET /v1/models/NAME[/versions/N]."""
    model = _servable(request)
    return JSONResponse({"model_version_status": [{
        "version": str(model.version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})


async def model_metadata(request):
    """GET /v1/models/NAME[/versions/N]/metadata."""
    return JSONResponse(signature_metadata(_servable(request)))


async def rest_predict(request):
    """POST /v1/models/NAME[/versions/N]:predict, TF Serving's row or columnar format."""
    model = _servable(request)
    images, _, row = parse_predict_request(await read_body(request))
    logits = await request.app.state.batcher.logits(images)
    return JSONResponse(format_outputs(model.outputs(logits), row))


async def upload_predict(request):
    """POST /predict: multipart image files (field `files`); options segment and top_k (query or form)."""
    model, batcher = request.app.state.model, request.app.state.batcher
    files, segment, top_k = await read_uploads(request, len(model.class_names))
    answers = []
    for name, data in files:
        characters = await asyncio.to_thread(_characters, data, name, segment)
        logits = await batcher.logits(np.stack([c.image for c in characters]))
        top = ranked(model.outputs(logits)["probabilities"], model.class_names, top_k)
        answers.append(describe(name, characters, top, segment))
    return JSONResponse(answers)


async def index(request):
    return HTMLResponse(page(request.app.state.model))


async def read_body(request) -> bytes:
    """The request's body, refused with a 413 past MAX_BODY (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise RequestError(f"the request is {int(declared)} bytes; the limit is {MAX_BODY // 2**20} MiB", 413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestError(f"the request is over the {MAX_BODY // 2**20} MiB limit", 413)
    return body


async def read_uploads(request, classes: int) -> tuple[list[tuple[str, bytes]], bool, int]:
    """([(file name, bytes)], segment, top_k) of an upload."""
    declared = request.headers.get("content-length") or "0"
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise RequestError(f"the upload is over the {MAX_BODY // 2**20} MiB limit", 413)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError("send the images as multipart/form-data in the field 'files'")
    async with request.form(max_files=64, max_fields=16, max_part_size=MAX_BODY) as form:
        options = {**request.query_params, **{k: v for k, v in form.items() if isinstance(v, str)}}
        segment = str(options.get("segment", "false")).lower() in ("1", "true", "yes", "on")
        top_k = _top_k(options.get("top_k"), classes)
        uploads = [f for f in form.getlist("files") if not isinstance(f, str)]
        if not uploads:
            raise RequestError("no image in the field 'files'; upload one or more PNG or JPEG files")
        return [(f.filename or "upload", await f.read()) for f in uploads], segment, top_k


# -- errors: each carries its HTTP status

def _error(message: str, status: int):
    return JSONResponse({"error": message}, status_code=status)


async def request_error(request, e: RequestError):
    return _error(str(e), e.status)


async def image_error(request, e: ImageError):
    return _error(str(e), e.http_status)


async def http_error(request, e):
    """Starlette's own refusals: no such path or method, or a multipart body it cannot parse."""
    path = request.url.path
    if e.status_code == 404:
        return _error(f"unknown path {path}; see TensorFlow Serving's REST API", 404)
    if e.status_code == 405:
        return _error(f"{request.method} is not served at {path}; use {e.headers.get('Allow', 'another method')}", 405)
    return _error(f"malformed upload ({e.detail}); send multipart/form-data with image files in 'files'",
                  e.status_code)


async def client_gone(request, e):
    """The client left mid-request: nobody to answer, nothing to report."""
    log.debug("a client disconnected during %s %s", request.method, request.url.path)
    return Response(status_code=400)


class ServableName(Convertor):
    """A model's name in a path: it stops before ":predict"."""

    regex = "[^/:]+"

    def convert(self, value):
        return value

    def to_string(self, value):
        return value


register_url_convertor("servable", ServableName())


def create_app(model: ServedModel, *, max_batch_size: int = 64, batch_timeout_ms: float = 2.0):
    """The Starlette application: TF Serving's REST API, POST /predict for image files, and GET /."""
    batcher = Batcher(model, max_batch_size, batch_timeout_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.model, app.state.batcher = model, batcher
        batcher.start()
        yield
        await batcher.stop()
        log.info("stopped serving %s", model.name)

    models = "/v1/models/{name:servable}"
    versions = models + "/versions/{version:int}"
    routes = [Route("/", index), Route("/predict", upload_predict, methods=["POST"])]
    for base in (models, versions):
        routes += [Route(base + ":predict", rest_predict, methods=["POST"]),
                   Route(base + "/metadata", model_metadata, methods=["GET"]),
                   Route(base, model_status, methods=["GET"])]
    handlers = {RequestError: request_error, ImageError: image_error, HTTPException: http_error,
                ClientDisconnect: client_gone}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


def _top_k(text, classes: int) -> int:
    if text is None:
        return min(DEFAULT_TOP_K, classes)
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise RequestError(f"top_k must be an integer, got {text!r}") from None
    if not 1 <= value <= classes:
        raise RequestError(f"top_k must be between 1 and {classes}, got {value}")
    return value


def _characters(data: bytes, name: str, segment: bool):
    return characters_in(read_image(data, name), name, segment)


def serve(path: str, *, host: str = "127.0.0.1", port: int = 8501, model_name: str | None = None,
          max_batch_size: int = 64, batch_timeout_ms: float = 2.0, xla: bool = True) -> None:
    """Load the model and serve until SIGINT or SIGTERM (uvicorn finishes the requests in flight)."""
    import uvicorn

    model = ServedModel(path, model_name, xla, max_batch=max(max_batch_size, BUCKETS[-1]))
    app = create_app(model, max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms)
    log.info("serving %s as %r on http://%s:%d/ (REST: /v1/models/%s:predict)", path, model.name, host, port,
             model.name)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)
