"""`python -m dist_finetune.serve --model EXPORT [--host 127.0.0.1] [--port 8000]`: the classifier over HTTP.

FastAPI on uvicorn (the `serve` extra). Concurrent requests are gathered into one forward pass (dynamic
batching: up to --max-batch texts, or what arrived within --max-wait-ms of the first), sorted by length so the
batch pads little; the forward runs in a worker thread, so the server keeps accepting while it computes. The
answers are `Classifier.predict`'s. Client mistakes are 4xx with a JSON error naming the field, never a 500; on
SIGTERM uvicorn stops accepting, finishes the requests in flight, and the process exits 0.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`Request`) at runtime.
"""

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .classifier import Classifier, Prediction
from .cli import add_backend_arg, add_device_arg, run_command
from .distributed import leave
from .errors import UserError
from .formats import optional

DESCRIPTION = "Serve a finetuned model over HTTP, batching concurrent requests into one forward pass."
EPILOG = """examples:
  python -m dist_finetune.serve --model runs/quickstart
  python -m dist_finetune.serve --model runs/quickstart/export --port 9000 --max-batch 64 --max-wait-ms 10

Then: curl -s localhost:8000/v1/classify -d '{"texts": ["WINNER! Claim your prize", "see you at 8"]}'
GET /v1/model (labels, max_length, task), /healthz, /readyz, /metrics (Prometheus); / is a page to try it.
"""
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_finetune.serve", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="a run folder (its export/ folder is used) or an export folder")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on (default: 8000)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N",
                   help="texts in one forward pass at most (default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long a first request waits for others to share its forward pass (default: 5)")
    p.add_argument("--max-texts", type=int, default=256, metavar="N",
                   help="texts in one request at most (default: 256)")
    p.add_argument("--max-bytes", type=int, default=1_000_000, metavar="N",
                   help="bytes of one request body at most (default: 1000000)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request not answered in this time gets 504 (default: 30)")
    add_device_arg(p)
    add_backend_arg(p)
    args = p.parse_args(argv)
    for name in ("max_batch", "max_texts", "max_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_wait_ms < 0 or args.timeout <= 0 or not 0 <= args.port <= 65535:
        p.error("--max-wait-ms must be >= 0, --timeout > 0 and --port between 0 and 65535")
    return args


class ClientError(Exception):
    """A request the client got wrong: answered with `status` and {"error": {"field", "message"}}."""

    def __init__(self, status: int, field_name: str, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field_name, message


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        counts = self.counts or [0] * len(self.buckets)
        out = [f'{name}_bucket{{le="{bound:g}"}} {n}' for bound, n in zip(self.buckets, counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                      f"{name}_count {self.count}"]


@dataclass
class Metrics:
    """What /metrics exposes, in Prometheus' text format."""

    requests: dict[int, int] = field(default_factory=dict)  # HTTP status -> count
    texts: int = 0
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))

    def text(self) -> str:
        lines = ["# TYPE dist_finetune_requests_total counter"]
        lines += [f'dist_finetune_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.requests.items())]
        errors = sum(n for code, n in self.requests.items() if code >= 400)
        lines += ["# TYPE dist_finetune_errors_total counter", f"dist_finetune_errors_total {errors}",
                  "# TYPE dist_finetune_texts_total counter", f"dist_finetune_texts_total {self.texts}",
                  "# TYPE dist_finetune_request_seconds histogram", *self.latency.lines("dist_finetune_request_seconds"),
                  "# TYPE dist_finetune_batch_texts histogram", *self.batch_size.lines("dist_finetune_batch_texts")]
        return "\n".join(lines) + "\n"


@dataclass
class Batcher:
    """Gathers the texts of concurrent requests into forward passes of at most `max_batch` texts."""

    classifier: Classifier
    max_batch: int
    max_wait: float  # seconds
    metrics: Metrics
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[Prediction]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((list(zip(texts, pairs or [None] * len(texts))), future))
        return await future

    async def run(self) -> None:
        while True:
            waiting = [await self.queue.get()]
            size, deadline = len(waiting[0][0]), time.monotonic() + self.max_wait
            while size < self.max_batch:
                try:
                    item = await asyncio.wait_for(self.queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                waiting.append(item)
                size += len(item[0])
            await self.forward([item for item in waiting if not item[1].done()])  # a timed-out request: gone

    async def forward(self, waiting: list[tuple[list[tuple[str, str | None]], asyncio.Future]]) -> None:
        texts = [text for request, _ in waiting for text in request]
        if not texts:
            return
        order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]) + len(texts[i][1] or ""))  # little padding
        self.metrics.batch_size.observe(len(texts))
        pairs = [texts[i][1] for i in order] if self.classifier.pairs else None
        try:
            results = await asyncio.to_thread(self.classifier.predict, [texts[i][0] for i in order], self.max_batch,
                                              pairs=pairs)  # one request may bring more texts than --max-batch
        except Exception as exc:  # answered as a server error, and the server goes on
            for _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        by_position = [None] * len(texts)
        for slot, i in enumerate(order):
            by_position[i] = results[slot]
        start = 0
        for request, future in waiting:
            if not future.done():
                future.set_result(by_position[start:start + len(request)])
            start += len(request)


def answer(p: Prediction) -> dict[str, Any]:
    """One text's JSON: label and class probabilities; labels (multi_label) or values (regression)."""
    if p.values is not None:
        return {"values": p.values, "truncated": p.truncated}
    probabilities = {str(k): v for k, v in p.probabilities.items()}
    if p.labels is not None:
        return {"labels": p.labels, "probabilities": probabilities, "truncated": p.truncated}
    return {"label": p.label, "probabilities": probabilities, "truncated": p.truncated}


def texts_of(body: bytes, max_bytes: int, max_texts: int, pairs: bool) -> tuple[list[str], list[str] | None]:
    """The request's texts (and, for a model of text pairs, their second texts), or a ClientError naming what is
    wrong."""
    if len(body) > max_bytes:
        raise _too_big(f"{len(body)} bytes", max_bytes)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(400, "body", f"the body is not JSON ({exc}); send {{\"texts\": [\"...\"]}}") from None
    except RecursionError:
        raise ClientError(400, "body", "the body is JSON nested too deeply to read; send {\"texts\": [\"...\"]}") \
            from None
    if not isinstance(data, dict):
        raise ClientError(422, "texts", 'send a JSON object with "texts" (a list of strings) or "text" (a string)')
    texts = _strings(data, "texts", "text", max_texts)
    if not pairs:
        if "pairs" in data or "pair" in data:
            raise ClientError(422, "pairs" if "pairs" in data else "pair",
                              "this model classifies single texts; send texts without pairs")
        return texts, None
    second = _strings(data, "pairs", "pair", max_texts)
    if len(second) != len(texts):
        raise ClientError(422, "pairs", f"{len(texts)} texts but {len(second)} pairs: send one pair per text")
    return texts, second


async def body_of(request: Any, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it passes max_bytes, or before anything is read when its
    Content-Length does: a client cannot make the server hold more than the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_big(f"{int(declared)} bytes", max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_big(f"more than {max_bytes} bytes", max_bytes)
    return bytes(body)


def _too_big(size: str, max_bytes: int) -> ClientError:
    return ClientError(413, "body", f"the request body has {size}; at most {max_bytes} are accepted")


def _strings(data: dict, many: str, one: str, max_texts: int) -> list[str]:
    """data[many] (a list) or [data[one]]: non-empty strings, at most max_texts."""
    if (many in data) == (one in data):
        raise ClientError(422, many, f'send "{many}" (a list of strings) or "{one}" (a string), one of the two')
    name = many if many in data else one
    texts = data[many] if many in data else [data[one]]
    if not isinstance(texts, list) or not texts:
        raise ClientError(422, name, f"{name} must be a non-empty list of strings")
    if len(texts) > max_texts:
        raise ClientError(413, name, f"{len(texts)} texts in one request; at most {max_texts} are accepted")
    for i, text in enumerate(texts):
        where = f"{name}[{i}]" if name == many else name
        if not isinstance(text, str):
            raise ClientError(422, where, f"{where} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ClientError(422, where, f"{where} is empty; give a non-empty text")
    return texts


def model_card(classifier: Classifier, source: Path) -> dict[str, Any]:
    info = classifier.info
    task = "regression" if info.targets is not None else "multi_label" if info.thresholds is not None else (
        "single_label")
    card = {"labels": classifier.labels, "max_length": info.max_length, "padding": info.padding, "task": task,
            "long_texts": info.long_texts, "pairs": classifier.pairs, "source": str(source),
            "backend": classifier.backend}
    config = source / "model_config.json"
    if config.is_file():
        spec = json.loads(config.read_text(encoding="utf-8"))
        card.update(pooling=spec.get("pooling"), architecture=spec.get("gpt"), thresholds=spec.get("thresholds"))
    return card


def build_app(classifier: Classifier, source: Path, args: argparse.Namespace) -> Any:
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    metrics = Metrics()
    state: dict[str, Any] = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(classifier, args.max_batch, args.max_wait_ms / 1000, metrics)
        task = asyncio.create_task(batcher.run())
        state.update(batcher=batcher, ready=True)
        yield
        state["ready"] = False
        task.cancel()

    app = FastAPI(title="dist_finetune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def done(status: int, start: float, payload: Any) -> JSONResponse:
        metrics.requests[status] = metrics.requests.get(status, 0) + 1
        metrics.latency.observe(time.perf_counter() - start)
        return JSONResponse(payload, status_code=status)

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            texts, pairs = texts_of(await body_of(request, args.max_bytes), args.max_bytes, args.max_texts,
                                    classifier.pairs)
            predictions = await asyncio.wait_for(state["batcher"].classify(texts, pairs), args.timeout)
        except ClientError as exc:
            return done(exc.status, start, {"error": {"field": exc.field, "message": exc.message}})
        except asyncio.TimeoutError:
            return done(504, start, {"error": {"field": None, "message": f"no answer within {args.timeout} s"}})
        except Exception as exc:  # the model failed: the server stays up
            return done(500, start, {"error": {"field": None, "message": f"{type(exc).__name__}: {exc}"}})
        metrics.texts += len(texts)
        return done(200, start, {"predictions": [answer(p) for p in predictions]})

    add_info_routes(app, model_card(classifier, source), metrics, state)
    return app


def add_info_routes(app: Any, card: dict[str, Any], metrics: Metrics, state: dict[str, Any]) -> None:
    """GET /v1/model, /healthz, /readyz, /metrics and the page at /."""
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    @app.get("/v1/model")
    async def model() -> JSONResponse:
        return JSONResponse(card)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dist_finetune</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}textarea{width:100%;height:6em}
.bar{background:#4a7;height:1em;margin:.2em 0}#out div{margin:.3em 0}</style></head>
<body><h1>Try the classifier</h1>
<textarea id="text" placeholder="Paste a text"></textarea><br><button id="go">Classify</button>
<div id="label"></div><div id="out"></div>
<script>
document.getElementById("go").onclick = async () => {
  const r = await fetch("/v1/classify", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify({text: document.getElementById("text").value})});
  const data = await r.json();
  const out = document.getElementById("out"), label = document.getElementById("label");
  out.innerHTML = "";
  if (!r.ok) { label.textContent = "error: " + data.error.message; return; }
  const p = data.predictions[0];
  label.textContent = p.label !== undefined ? p.label : p.labels ? p.labels.join(", ") : JSON.stringify(p.values);
  for (const [name, value] of Object.entries(p.probabilities || {})) {
    const row = document.createElement("div");
    row.innerHTML = `<span class="name"></span> <span class="value">${value.toFixed(4)}</span>` +
                    `<div class="bar" style="width:${(100 * value).toFixed(1)}%"></div>`;
    row.querySelector(".name").textContent = name;
    out.appendChild(row);
  }
};
</script></body></html>
"""


def serve(args: argparse.Namespace) -> int:
    optional("fastapi", "serve", "dist_finetune.serve")
    uvicorn = optional("uvicorn", "serve", "dist_finetune.serve")
    classifier = Classifier.load(args.model, args.device, args.backend)
    source = classifier.source
    app = build_app(classifier, source, args)
    print(f"serving {source} ({classifier.backend}) on http://{args.host}:{args.port} (max batch {args.max_batch}, wait "
          f"{args.max_wait_ms:g} ms)", flush=True)
    check_port(args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.timeout)
    graceful_server_class()(config).run()
    return 0


def check_port(host: str, port: int) -> None:
    """A port another process holds is one line here, not uvicorn's log and exit code 3."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServeError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc}); choose another "
                             "port, or stop what holds it") from None


def graceful_server_class() -> type:
    """uvicorn's Server, made where uvicorn is imported (the `serve` extra), so --help works without it."""
    import uvicorn

    class Graceful(uvicorn.Server):
        """SIGTERM / SIGINT: stop accepting, finish what is in flight, and exit 0 (uvicorn re-raises the signal
        after its shutdown, which ends the process with -15: a failure to a supervisor)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Graceful



class ServeError(UserError):
    """The server cannot start where it was asked to."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: serve(args))


if __name__ == "__main__":
    leave(main())
