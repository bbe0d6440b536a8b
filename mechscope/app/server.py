"""The workbench: a local web app where a person types a prompt and looks inside the model,
runs a patching sweep with a progress bar, browses an SAE's features (``--sae DIR``), and
reopens earlier experiments.

The server only ever runs mechscope's own analyses on text it is sent; no endpoint runs user
code. It binds to 127.0.0.1 by default, answers only requests addressed to this machine by
name (a web page elsewhere cannot reach it through DNS rebinding), refuses cross-site writes,
and sends a Content-Security-Policy that lets the page load scripts from this server alone.
Errors reach the page as ``{"error": message}``: the library's own message for bad input, a
generic line (and the traceback in the server log) for anything else. One analysis runs on the
model at a time; a request that arrives during a patching sweep is told so at once (409) rather
than kept waiting, and stopping the server cancels the sweep at its next forward pass.
"""

from __future__ import annotations

import asyncio
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

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from mechscope.app.features import DEFAULT_SEQUENCES, NO_SAE, FeatureBrowser
from mechscope.app.inputs import (
    ActivationRequest,
    BadRequest,
    BodyLimit,
    ExperimentId,
    FeatureRequest,
    PatchingRequest,
    PromptRequest,
    error,
    http_message,
    validation_message,
    validation_status,
)
from mechscope.app.jobs import INTERNAL_ERROR, JobRunner, user_message
from mechscope.app.store import MAX_ID, ExperimentStore
from mechscope.interventions.sweeps import RESID_HOOKS
from mechscope.model.names import act_name
from mechscope.viz import html as viz_html
from mechscope.viz.prompts import Prompt, read_prompt, same_length, single_token
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
LOCK_WAIT_S = 5.0  # how long a request waits for another request's forward pass before a 409
PAGE_LIMIT = 500  # the most experiments one list request returns


def shorten(text: str) -> str:
    return textwrap.shorten(" ".join(text.split()), TITLE_WIDTH, placeholder=" …") or "(empty)"


def patching_title(clean: Prompt, corrupted: Prompt, hook: str, text: str) -> str:
    """A sweep named by what it swaps, the first token where the prompts differ:
    ``John → Mary · resid_pre · When Mary and …``."""
    length = min(clean.length, corrupted.length)
    differ = (clean.ids[0, :length] != corrupted.ids[0, :length]).nonzero().flatten().tolist()
    swap = f"{word(clean.labels[differ[0]])} → {word(corrupted.labels[differ[0]])}" if differ else "no token differs"
    return shorten(f"{swap} · {hook} · {text}")


def word(label: str) -> str:
    return label.strip() or repr(label)


# ------------------------------------------------------------------ the shared state


def read_static() -> dict[str, bytes]:
    """The page, its own code and the viz bundle, read from the installed package once."""
    app = files("mechscope.app") / "static"
    static = {name: (app / name).read_bytes() for name in ("workbench.html", "workbench.js", "workbench.css")}
    return static | {f"mechscope.{kind}": viz_bundle(kind) for kind in ("js", "css")}


def viz_bundle(kind: str) -> bytes:
    """The widgets' JavaScript or CSS, joined exactly as the report inlines it."""
    return (viz_html.bundle_js() if kind == "js" else viz_html.bundle_css()).encode()


@dataclass
class Workbench:
    """What the routes share. Hook functions live on the model's modules while a forward pass
    runs, so two analyses at once would see each other's hooks: ``lock`` runs one at a time."""

    model: Any
    name: str
    store: ExperimentStore
    max_tokens: int
    features: FeatureBrowser | None = None  # with an SAE (--sae DIR)
    jobs: JobRunner = field(default_factory=JobRunner)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def compute(self, analysis: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one library analysis on the model, within the page's token limit."""
        return self.exclusive(analysis, *args, max_tokens=self.max_tokens, **kwargs)

    def exclusive(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``call`` alone on the model; input it refuses becomes a BadRequest.

        A request never waits out a sweep on the lock (it would hold one of the server's threads
        for minutes, and enough of them would freeze even the progress polls): it gets a 409."""
        if not self.lock.acquire(timeout=0 if self.jobs.running() else LOCK_WAIT_S):
            raise BadRequest(self.busy(), 409)
        try:
            return self.refusing(call, *args, **kwargs)
        finally:
            self.lock.release()

    def busy(self) -> str:
        job = self.jobs.running()
        if job is None:
            return "the model is busy with another request; try again in a moment"
        return f"a patching sweep is running ({int(job.progress * 100)}% done); try again when it finishes"

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
            "sae": None if self.features is None else self.features.describe(),
        }

    def save(self, kind: str, title: str, settings: BaseModel, sections: list[Any]) -> dict[str, Any]:
        payload = [section.to_json() for section in sections]
        id = self.store.save(kind, self.name, shorten(title), settings.model_dump(), {"sections": payload})
        return {"experiment": id, "sections": payload}

    def check_patching(self, request: PatchingRequest) -> str:
        """Refuse a bad pair now, with a 400, rather than minutes later as a failed job; return
        the sweep's title."""
        if request.hook not in self.resid_hooks():
            raise BadRequest(f"hook must be one of {', '.join(self.resid_hooks())}; got {request.hook!r}")
        clean = self.refusing(read_prompt, self.model, request.clean, what="clean prompt", max_tokens=self.max_tokens)
        corrupted = self.refusing(
            read_prompt, self.model, request.corrupted, what="corrupted prompt", max_tokens=self.max_tokens
        )
        self.refusing(same_length, clean, corrupted)
        answer = self.refusing(single_token, self.model, request.answer, "answer")
        if answer == self.refusing(single_token, self.model, request.wrong, "wrong answer"):
            raise BadRequest(
                f"the answer and the wrong answer are the same token ({request.answer!r}); the sweep measures "
                "the logit difference between them, so give two different tokens"
            )
        return patching_title(clean, corrupted, request.hook, request.clean)

    def patching(self, request: PatchingRequest, title: str, progress: Callable[[float], None]) -> dict[str, Any]:
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
        return self.save("patching", title, request, sections)

    def feature(self, request: FeatureRequest) -> dict[str, Any]:
        """One SAE feature's dashboard, saved with the number of sequences it was measured on."""
        if self.features is None:
            raise BadRequest(NO_SAE)
        sequences = request.sequences or DEFAULT_SEQUENCES
        self.refusing(self.features.check, request.feature)  # a bad id is a 400 even while a sweep runs
        sections = self.exclusive(self.features.sections, request.feature, sequences)
        settings = request.model_copy(update={"sequences": sequences})
        return self.save("feature", self.features.title(request.feature, sequences), settings, sections)


# ------------------------------------------------------------------ the app


def create_app(
    model: Any,
    *,
    model_name: str,
    store: ExperimentStore,
    max_tokens: int = 256,
    allowed_hosts: Sequence[str] | None = LOCAL_HOSTS,
    sae: Any = None,
) -> FastAPI:
    """The workbench for ``model`` (a mechscope Model with a tokenizer), saving to ``store``.

    ``allowed_hosts``: the names the server answers to (None: any, for a server deliberately
    exposed beyond this machine). ``sae``: a :class:`mechscope.sae.SAE` trained on ``model``,
    whose features the page then browses (the language organism only, see app.features)."""
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"the workbench needs a model with a tokenizer; {model_name!r} has none")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1; got {max_tokens}")
    features = None if sae is None else FeatureBrowser(model, sae, model_name)
    bench = Workbench(model, model_name, store, max_tokens, features)
    static = read_static()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await stop(bench.jobs)

    # No /docs: the API explorer would load its scripts from a CDN.
    app = FastAPI(
        title="mechscope workbench",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.workbench = bench
    app.add_middleware(BodyLimit)
    guard(app, allowed_hosts)  # outside BodyLimit, so its 413s get the security headers too
    add_error_handlers(app)
    add_page_routes(app, static)
    add_api_routes(app, bench)
    return app


async def stop(jobs: JobRunner) -> None:
    """Cancel a running sweep at its next forward pass rather than wait for its end, waiting
    on a worker thread so the event loop stays free to finish the server's shutdown."""
    if jobs.running() is not None:
        print("stopping: cancelling the running patching job", flush=True)
    await asyncio.to_thread(jobs.shutdown)


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal as ``{"error": sentence}``: the library's, pydantic's, and Starlette's own."""

    def refused(request: Request, problem: BadRequest) -> Response:
        return error(problem.message, problem.status)

    def invalid(request: Request, problem: RequestValidationError) -> Response:
        return error(validation_message(problem), validation_status(problem))

    def http(request: Request, problem: HTTPException) -> Response:
        message = http_message(problem.status_code, problem.detail, request.method, request.url.path)
        response = error(message, problem.status_code)
        response.headers.update(problem.headers or {})  # a 405 keeps its Allow header
        return response

    app.add_exception_handler(BadRequest, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http)


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
        title = bench.check_patching(request)
        return {"job": bench.jobs.submit(lambda progress: bench.patching(request, title, progress))}

    @app.post("/api/feature")
    def feature(request: FeatureRequest) -> dict[str, Any]:
        return bench.feature(request)

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
    def experiments(
        limit: int = Query(100, ge=1, le=PAGE_LIMIT), before: int | None = Query(None, ge=1, le=MAX_ID)
    ) -> list[dict[str, Any]]:
        """The newest experiments first; ``before`` (the last id shown) for the next page."""
        return [summary.to_json() for summary in bench.store.list(limit, before)]

    @app.get("/api/experiments/{id}")
    def experiment(id: ExperimentId) -> dict[str, Any]:
        try:
            found = bench.store.get(id)
        except KeyError as missing:
            raise BadRequest(user_message(missing), 404) from None
        reply = found.to_json()
        reply.pop("result")
        return reply | {"settings": found.settings, "sections": found.result.get("sections", [])}

    @app.delete("/api/experiments/{id}")
    def delete_experiment(id: ExperimentId) -> dict[str, Any]:
        try:
            bench.store.delete(id)
        except KeyError as missing:
            raise BadRequest(user_message(missing), 404) from None
        return {"deleted": id}


# ------------------------------------------------------------------ the command


def serve(
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    db: Path | None = None,
    max_tokens: int = 256,
    sae: Path | None = None,
) -> None:
    """Load ``model`` (an organism name, a run folder, or a HuggingFace directory or hub id;
    default the shipped "language" organism) and, with ``sae``, the SAE saved in that folder;
    print the URL and serve the workbench."""
    import uvicorn

    from mechscope.sae import SAE
    from mechscope.toys.zoo import load_any

    name = model or DEFAULT_MODEL
    store = ExperimentStore(db)
    loaded = load_any(name)
    features = None if sae is None else SAE.load(sae, device=next(loaded.parameters()).device)
    app = create_app(
        loaded, model_name=name, store=store, max_tokens=max_tokens, allowed_hosts=hosts_for(host), sae=features
    )
    if host not in LOCAL_HOSTS:
        print(f"warning: serving on {host}: anyone who can reach this machine can use the workbench")
    shown = f"[{host}]" if ":" in host else host
    print(f"mechscope workbench for {name}: http://{shown}:{port}/  (experiments saved in {store.path})")
    if features is not None:
        print(f"browsing the features of the SAE in {sae} ({features.cfg.d_sae:,} on {features.cfg.hook_name})")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def hosts_for(host: str) -> tuple[str, ...] | None:
    """The names to answer to when bound to ``host``: this machine's, plus the address itself
    when it is another one; any name when bound to every interface."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return LOCAL_HOSTS if host in LOCAL_HOSTS else (*LOCAL_HOSTS, host)
