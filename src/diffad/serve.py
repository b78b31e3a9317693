"""``diffad serve``: an HTTP API over a trained, calibrated model (FastAPI on uvicorn).

* ``POST /inspect``: the photo as the raw request body (any ``Content-Type``), or as ``multipart/form-data`` files
  (any field names, several at once). Answers JSON: for a raw body one object, for a form ``{"results": [...]}`` with
  one object per file (its ``file`` name added). Each object is what a Hub repo's ``handler.py`` answers
  (:func:`diffad.pipelines.self_aware_inpaint.inspection.answer`): ``score``, ``decision`` (``ok``/``defect``, or
  ``error`` with ``error`` saying why), ``threshold``, ``map``, ``method`` and, with ``?overlay=1``, ``overlay_png``
  (base64 PNG: the heat map over the photo, as ``diffad detect`` draws it). An unreadable photo sent as the body
  is a 422 with that object; a request over ``--max-upload-mb`` is a 413.
* ``GET /health``: ``{"status": "ok"}`` once the model is loaded.
* ``GET /model``: the model card's summary and the calibration's facts (sampler, threshold, held-out rates).

Scores are ``diffad detect``'s for the same file: the same reader (8-bit RGB by the pipeline's ``rgb_image``), the
same seeding (``--seed`` and the photo's pixels) and the same decision (``inspect_photos``, one photo per UNet
call). Requests are not batched together: detect's bit-identical scores need one photo per UNet call, and on CPU
batching saves at most ~10%. One photo is scored at a time; ``/health`` answers meanwhile.

Binds to 127.0.0.1 unless ``--host`` says otherwise (a one-line warning then: the API has no login).
FastAPI and uvicorn are an optional extra: ``pip install 'diffad[serve]'``.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time

import argparse
import logging
import threading
from pathlib import Path
from typing import Any, Optional

from diffad.detect import load_pipeline, render_overlay
from diffad.listen import check_listen_address
from diffad.pipelines.self_aware_inpaint import threshold_key
from diffad.pipelines.self_aware_inpaint.inspection import MAX_IMAGE_BYTES, answer, decode_photo, model_facts

__all__ = ["INSTALL_HINT", "Service", "build_api", "register", "run"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "diffad serve needs FastAPI and uvicorn: pip install 'diffad[serve]'"
DEFAULT_PORT = 8000


class Service:
    """A loaded model and the options every request is answered with; one model call at a time.

    Args:
        pipe: a calibrated ``SelfAwareInpaintPipeline``.
        model: the folder or Hub id it came from (for ``GET /model``).
        method, anomaly_map, seed: as ``diffad detect``'s ``--method``, ``--anomaly-map``, ``--seed``.
        max_upload_bytes: the largest request body accepted (413 beyond).
    """

    def __init__(self, pipe, model: str | Path = "", *, method: str = "self_aware", anomaly_map: Optional[str] = None,
                 seed: int = 0, max_upload_bytes: int = MAX_IMAGE_BYTES):
        from diffad.detect import _check_options

        self.pipe, self.model, self.method, self.seed = pipe, str(model), method, seed
        self.anomaly_map = anomaly_map or pipe.default_map(method)
        _check_options(pipe, model, method, self.anomaly_map, None)  # detect's refusals, word for word
        self.max_upload_bytes = max_upload_bytes
        self._lock = threading.Lock()

    def inspect(self, data: bytes, *, overlay: bool = False) -> tuple[dict[str, Any], bool]:
        """``(answer, readable)`` for one uploaded file; an unreadable one gets ``decision: error`` and its ``error``."""
        try:
            photo = decode_photo(data)
        except ValueError as exc:
            return {"score": None, "decision": "error", "threshold": self.threshold, "map": self.anomaly_map,
                    "method": self.method, "error": str(exc)}, False
        with self._lock:
            return answer(self.pipe, photo, method=self.method, anomaly_map=self.anomaly_map, seed=self.seed,
                          overlay=overlay, render_overlay=render_overlay), True

    @property
    def threshold(self) -> Optional[float]:
        return self.pipe.calibration.threshold(threshold_key(self.method, self.anomaly_map))

    def facts(self) -> dict[str, Any]:
        """``GET /model``: the model, the card's summary (markdown) and :func:`model_facts`."""
        from diffad.app import Inspector, model_summary

        card = model_summary(self.model, Inspector(self.pipe, method=self.method, seed=self.seed))
        return {"model": self.model, "seed": self.seed, "card": card,
                **model_facts(self.pipe, method=self.method, anomaly_map=self.anomaly_map)}


async def _read_body(request, limit: int) -> bytes:
    """The request body, or ``HTTPException(413)`` as soon as it is known to exceed ``limit`` bytes."""
    from fastapi import HTTPException

    too_large = HTTPException(413, f"the upload exceeds {limit} bytes (diffad serve --max-upload-mb)")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_files(request, body: bytes) -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of every file of a multipart body already read."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form()
    files = []
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.append((value.filename or "", await value.read()))
    await form.close()
    return files


def build_api(service: Service):
    """The FastAPI application over ``service`` (see the module docstring)."""
    try:
        from fastapi import FastAPI, HTTPException, Request
        from fastapi.concurrency import run_in_threadpool
        from fastapi.responses import JSONResponse
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc

    api = FastAPI(title="diffad", description="Visual inspection with a diffusion model: POST a photo to /inspect.")

    @api.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @api.get("/model")
    def model() -> dict:
        return service.facts()

    @api.post("/inspect")
    async def inspect(request: Request, overlay: bool = False):
        body = await _read_body(request, service.max_upload_bytes)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            files = await _form_files(request, body)
            if not files:
                raise HTTPException(400, "the form holds no file: send the photos as multipart files")
            results = []
            for name, data in files:
                result, _ = await run_in_threadpool(service.inspect, data, overlay=overlay)
                results.append({"file": name, **result})
            return {"results": results}
        if not body:
            raise HTTPException(400, "empty body: send the photo's bytes, or multipart files")
        result, readable = await run_in_threadpool(service.inspect, body, overlay=overlay)
        return JSONResponse(result, status_code=200 if readable else 422)

    return api


def register(subparsers) -> None:
    """Add ``diffad serve`` to the ``diffad`` command."""
    from diffad.pipelines.self_aware_inpaint import MAP_NAMES, METHODS

    parser = subparsers.add_parser(
        "serve", help="an HTTP API: POST /inspect a photo, get its score, decision and overlay as JSON",
        description="Serve a trained, calibrated model (folder or Hub id) over HTTP (FastAPI + uvicorn): POST "
                    "/inspect (raw image body or multipart files; ?overlay=1 adds a base64 PNG), GET /health, GET "
                    "/model. Scores equal diffad detect's. Binds to 127.0.0.1 unless --host says otherwise.")
    parser.add_argument("--model", required=True, help="model folder or Hub repo id (org/name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument("--anomaly-map", choices=MAP_NAMES, default=None,
                        help="the map scored (default: the method's, as diffad detect)")
    parser.add_argument("--method", choices=METHODS, default="self_aware")
    parser.add_argument("--seed", type=int, default=0, help="seeds each image's noise with its pixels (default: 0)")
    parser.add_argument("--max-upload-mb", type=float, default=MAX_IMAGE_BYTES / 2**20,
                        help=f"largest request body in MiB; larger ones get 413 (default: {MAX_IMAGE_BYTES // 2**20})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad serve`` (blocks until interrupted)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    if not args.max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    check_listen_address(args.host, args.port, "the API")  # before the model loads, and before a URL is printed
    service = Service(load_pipeline(args.model), args.model, method=args.method, anomaly_map=args.anomaly_map,
                      seed=args.seed, max_upload_bytes=int(args.max_upload_mb * 2**20))
    print(f"diffad serve on http://{args.host}:{args.port} (POST /inspect; Ctrl+C to stop)", flush=True)
    uvicorn.run(build_api(service), host=args.host, port=args.port, log_level="warning")
    return 0
