"""The workbench: a local web app where a person types a prompt and looks inside the model,
runs a patching sweep with a progress bar, and reopens earlier experiments.

The server only ever runs mechscope's own analyses on text it is sent; no endpoint runs user
code. It binds to 127.0.0.1 by default, answers only requests addressed to this machine by
name (a web page elsewhere cannot reach it through DNS rebinding), refuses cross-site POSTs,
and sends a Content-Security-Policy that lets the page load scripts from this server alone.
Errors reach the page as ``{"error": message}``: the library's own message for bad input, a
generic line (and the traceback in the server log) for anything else.
"""

from __future__ import annotations

import logging
import textwrap
import threading
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from mechscope.app.jobs import INTERNAL_ERROR, JobRunner, user_message
from mechscope.app.store import ExperimentStore
from mechscope.interventions.sweeps import RESID_HOOKS
from mechscope.model.names import act_name
from mechscope.viz.prompts import read_prompt, same_length, single_token
from mechscope.viz.sections import activation_section, patching_sections, prompt_sections

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "language"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",  # the widgets style through element.style (CSSOM), which the policy allows
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
TITLE_WIDTH = 80


# ------------------------------------------------------------------ requests


class Strict(BaseModel):
    """A request body: unknown fields are refused, so a typo in a field name is not ignored."""

    model_config = ConfigDict(extra="forbid")


class PromptRequest(Strict):
    prompt: str
    answer: str | None = None
    wrong: str | None = None


class ActivationRequest(Strict):
    prompt: str
    hook: str = Field(min_length=1)
    index: int | None = None


class PatchingRequest(Strict):
    clean: str
    corrupted: str
    answer: str
    wrong: str
    hook: str = "resid_pre"


class BadRequest(Exception):
    """Input the library refused: the message, written for the user, goes to the page."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def validation_message(error: RequestValidationError) -> str:
    """Pydantic's errors as one sentence per field: ``answer: Input should be a valid string``."""
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        if problem.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON")
        elif not where:
            parts.append(f"the request body must be a JSON object ({problem.get('msg', 'invalid')})")
        else:
            parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def shorten(text: str) -> str:
    return textwrap.shorten(" ".join(text.split()), TITLE_WIDTH, placeholder=" …") or "(empty)"


# ------------------------------------------------------------------ the shared state


def read_static() -> dict[str, bytes]:
    """The page, its own code and the viz bundle, read from the installed package once."""
    app, viz = files("mechscope.app") / "static", files("mechscope.viz") / "static"
    sources = {name: app / name for name in ("workbench.html", "workbench.js", "workbench.css")}
    sources |= {name: viz / name for name in ("mechscope.js", "mechscope.css")}
    return {name: source.read_bytes() for name, source in sources.items()}


@dataclass
class Workbench:
    """What the routes share. Hook functions live on the model's modules while a forward pass
    runs, so two analyses at once would see each other's hooks: ``lock`` runs one at a time."""

    model: Any
    name: str
    store: ExperimentStore
    max_tokens: int
    jobs: JobRunner = field(default_factory=JobRunner)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def compute(self, analysis: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one library analysis on the model; input it refuses becomes a BadRequest."""
        with self.lock:
            return self.refusing(analysis, *args, max_tokens=self.max_tokens, **kwargs)

    @staticmethod
    def refusing(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (ValueError, KeyError) as problem:
            raise BadRequest(user_message(problem)) from None

    def resid_hooks(self) -> list[str]:
        """The residual-stream hook kinds a patching sweep can use on this model."""
        names = self.model.hook_dict
        return [h for h in RESID_HOOKS if any(act_name(h, i) in names for i in range(self.model.cfg.n_layers))]

    def describe(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {
            "name": self.name,
            "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads,
            "d_model": cfg.d_model,
            "n_ctx": cfg.n_ctx,
            "max_tokens": min(self.max_tokens, cfg.n_ctx),
            "hooks": self.resid_hooks(),
            "hook_points": list(self.model.hook_dict),
        }

    def save(self, kind: str, title: str, settings: BaseModel, sections: list[Any]) -> dict[str, Any]:
        payload = [section.to_json() for section in sections]
        id = self.store.save(kind, self.name, shorten(title), settings.model_dump(), {"sections": payload})
        return {"experiment": id, "sections": payload}

    def check_patching(self, request: PatchingRequest) -> None:
        """Refuse a bad pair now, with a 400, rather than minutes later as a failed job."""
        if request.hook not in self.resid_hooks():
            raise BadRequest(f"hook must be one of {', '.join(self.resid_hooks())}; got {request.hook!r}")
        clean = self.refusing(read_prompt, self.model, request.clean, what="clean prompt", max_tokens=self.max_tokens)
        corrupted = self.refusing(
            read_prompt, self.model, request.corrupted, what="corrupted prompt", max_tokens=self.max_tokens
        )
        self.refusing(same_length, clean, corrupted)
        self.refusing(single_token, self.model, request.answer, "answer")
        self.refusing(single_token, self.model, request.wrong, "wrong answer")

    def patching(self, request: PatchingRequest, progress: Callable[[float], None]) -> dict[str, Any]:
        """The body of a patching job, run on the job thread; saved when it finishes."""
        with self.lock:
            sections = patching_sections(
                self.model,
                request.clean,
                request.corrupted,
                answer=request.answer,
                wrong=request.wrong,
                hook=request.hook,
                progress=progress,
                max_tokens=self.max_tokens,
            )
        return self.save("patching", f"{request.clean} → {request.corrupted}", request, sections)


# ------------------------------------------------------------------ the app


def create_app(
    model: Any,
    *,
    model_name: str,
    store: ExperimentStore,
    max_tokens: int = 256,
    allowed_hosts: Sequence[str] | None = LOCAL_HOSTS,
) -> FastAPI:
    """The workbench for ``model`` (a mechscope Model with a tokenizer), saving to ``store``.

    ``allowed_hosts``: the names the server answers to (None: any, for a server deliberately
    exposed beyond this machine)."""
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"the workbench needs a model with a tokenizer; {model_name!r} has none")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1; got {max_tokens}")
    bench = Workbench(model, model_name, store, max_tokens)
    static = read_static()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        bench.jobs.shutdown()

    # No /docs: the API explorer would load its scripts from a CDN.
    app = FastAPI(title="mechscope workbench", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.workbench = bench
    guard(app, allowed_hosts)
    app.add_exception_handler(BadRequest, lambda request, problem: error(problem.message, problem.status))
    app.add_exception_handler(RequestValidationError, lambda request, problem: error(validation_message(problem), 400))
    add_page_routes(app, static)
    add_api_routes(app, bench)
    return app


def guard(app: FastAPI, allowed_hosts: Sequence[str] | None) -> None:
    """Refuse foreign hosts and cross-site writes, add the security headers to every response,
    and turn any unexpected exception into a generic 500 (the traceback goes to the log)."""

    @app.middleware("http")
    async def secure(request: Request, call_next):
        refusal = refuse(request, allowed_hosts)
        if refusal is not None:
            response = refusal
        else:
            try:
                response = await call_next(request)
            except Exception:
                logger.exception("%s %s failed", request.method, request.url.path)
                response = error(INTERNAL_ERROR, 500)
        response.headers.update(SECURITY_HEADERS)
        return response


def refuse(request: Request, allowed_hosts: Sequence[str] | None) -> Response | None:
    host = request.url.hostname or ""
    if allowed_hosts is not None and host.strip("[]") not in allowed_hosts:
        return error(f"this workbench answers only to {', '.join(allowed_hosts)}, not {host!r}", 400)
    origin = request.headers.get("origin")
    if request.method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != request.headers.get("host"):
        return error("cross-site requests are refused", 403)
    return None


def add_page_routes(app: FastAPI, static: dict[str, bytes]) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(static["workbench.html"], media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if name not in static or name.endswith(".html"):
            raise BadRequest(f"no static file {name!r}", 404)
        media = MEDIA_TYPES[Path(name).suffix]
        return Response(static[name], media_type=f"{media}; charset=utf-8")


def add_api_routes(app: FastAPI, bench: Workbench) -> None:
    # Plain `def` routes: FastAPI runs them on its thread pool, so a forward pass never blocks the event loop.

    @app.get("/api/model")
    def describe_model() -> dict[str, Any]:
        return bench.describe()

    @app.post("/api/prompt")
    def prompt(request: PromptRequest) -> dict[str, Any]:
        answers = {"answer": request.answer, "wrong": request.wrong}
        sections = bench.compute(prompt_sections, bench.model, request.prompt, **answers)
        return bench.save("prompt", request.prompt, request, sections)

    @app.post("/api/activation")
    def activation(request: ActivationRequest) -> dict[str, Any]:
        section = bench.compute(activation_section, bench.model, request.prompt, request.hook, request.index)
        return bench.save("activation", f"{request.hook} · {request.prompt}", request, [section])

    @app.post("/api/patching")
    def patching(request: PatchingRequest) -> dict[str, Any]:
        bench.check_patching(request)
        return {"job": bench.jobs.submit(lambda progress: bench.patching(request, progress))}

    @app.get("/api/jobs/{id}")
    def job(id: str) -> dict[str, Any]:
        try:
            found = bench.jobs.get(id)
        except KeyError as missing:
            raise BadRequest(user_message(missing), 404) from None
        reply: dict[str, Any] = {"state": found.state, "progress": found.progress}
        if found.state == "done":
            reply |= found.result
        if found.error is not None:
            reply["error"] = found.error
        return reply

    @app.get("/api/experiments")
    def experiments() -> list[dict[str, Any]]:
        return [summary.to_json() for summary in bench.store.list()]

    @app.get("/api/experiments/{id}")
    def experiment(id: int) -> dict[str, Any]:
        try:
            found = bench.store.get(id)
        except KeyError as missing:
            raise BadRequest(user_message(missing), 404) from None
        reply = found.to_json()
        reply.pop("result")
        return reply | {"settings": found.settings, "sections": found.result.get("sections", [])}


# ------------------------------------------------------------------ the command


def serve(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    db: Path | None = None,
    max_tokens: int = 256,
) -> None:
    """Load ``model`` (an organism name, a run folder, or a HuggingFace directory or hub id;
    default the shipped "language" organism), print the URL and serve the workbench."""
    import uvicorn

    from mechscope.toys.zoo import load_any

    name = model or DEFAULT_MODEL
    store = ExperimentStore(db)
    app = create_app(load_any(name), model_name=name, store=store, max_tokens=max_tokens, allowed_hosts=hosts_for(host))
    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}: anyone who can reach this machine can use the workbench")
    shown = f"[{host}]" if ":" in host else host
    print(f"mechscope workbench for {name}: http://{shown}:{port}/  (experiments saved in {store.path})")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def hosts_for(host: str) -> tuple[str, ...] | None:
    """The names to answer to when bound to ``host``: this machine's, plus the address itself
    when it is another one; any name when bound to every interface."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return LOCAL_HOSTS if host in LOCAL_HOSTS else (*LOCAL_HOSTS, host)
