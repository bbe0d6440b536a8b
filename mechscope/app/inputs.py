"""What the workbench's API accepts, and how it says no: request bodies that refuse unknown
fields and text that is not text, and every refusal as ``{"error": sentence}``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mechscope.app.features import MAX_SEQUENCES
from mechscope.app.store import MAX_ID

# Starlette's own refusals (no route, wrong method, body too large) as sentences.
HTTP_MESSAGES = {
    400: "the request body could not be read",
    404: "nothing here: {path}",
    405: "{method} is not allowed on {path}",
    413: "the request body is larger than the limit of {limit:,} bytes",
}
MAX_BODY_BYTES = 4 * 2**20  # two prompts at the library's 100,000-character limit, however escaped


class BadRequest(Exception):
    """A refusal written for the user (bad input, a missing experiment, a busy model): its
    message goes to the page with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes as it is read: at once when its Content-Length
    says so, else once the bytes received pass it (a chunked body declares no length). The 413
    is raised where the route reads the body, so it is answered like any other refusal."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        too_long = declared.isdigit() and int(declared) > self.limit
        received = 0

        async def counted() -> Message:
            nonlocal received
            if too_long:
                raise HTTPException(413)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413)
            return message

        await self.app(scope, counted, send)


def whole_text(text: str) -> str:
    """Refuse a lone surrogate (JSON can spell one, ``"\\ud800"``): it is not a character, and
    the tokenizer would fail on it deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as problem:
        code = ord(text[problem.start])
        raise ValueError(
            f"holds a lone surrogate U+{code:04X} at character {problem.start}, which is not text; remove it"
        ) from None
    return text


Text = Annotated[str, AfterValidator(whole_text)]
ExperimentId = Annotated[int, Path(ge=1, le=MAX_ID)]


class Strict(BaseModel):
    """A request body: unknown fields are refused, so a typo in a field name is not ignored."""

    model_config = ConfigDict(extra="forbid")


class PromptRequest(Strict):
    prompt: Text
    answer: Text | None = None
    wrong: Text | None = None


class ActivationRequest(Strict):
    prompt: Text
    hook: Text = Field(min_length=1)
    index: StrictInt | None = None  # "3" and true are mistakes, not 3 and 1


class PatchingRequest(Strict):
    clean: Text
    corrupted: Text
    answer: Text
    wrong: Text
    hook: Text = "resid_pre"


class FeatureRequest(Strict):
    feature: StrictInt  # checked against the SAE's width by the server, which knows it
    sequences: Annotated[StrictInt, Field(ge=1, le=MAX_SEQUENCES)] | None = None  # None: DEFAULT_SEQUENCES


def validation_message(error: RequestValidationError) -> str:
    """Pydantic's errors as one sentence per field: ``answer: Input should be a valid string``."""
    parts = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part not in ("body", "path", "query"))
        if problem.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON")
        elif not where:
            parts.append(f"the request body must be a JSON object ({problem.get('msg', 'invalid')})")
        elif problem.get("loc", ("",))[0] == "path":
            parts.append(f"{where} {problem.get('input')!r}: {problem_text(problem)}")
        else:
            parts.append(f"{where}: {problem_text(problem)}")
    return "; ".join(parts) or "invalid request"


def problem_text(problem: dict[str, Any]) -> str:
    """Our own validators' messages as written, without pydantic's "Value error, " in front."""
    raised = problem.get("ctx", {}).get("error")
    return str(raised) if problem.get("type") == "value_error" and raised else problem.get("msg", "invalid")


def validation_status(error: RequestValidationError) -> int:
    """A bad id in the path names nothing that exists (404); anything else is a bad request."""
    places = [problem.get("loc", ("",))[0] for problem in error.errors()]
    return 404 if places and all(place == "path" for place in places) else 400


def http_message(status: int, detail: Any, method: str, path: str) -> str:
    template = HTTP_MESSAGES.get(status)
    if template is None:
        return str(detail)
    return template.format(method=method, path=path, limit=MAX_BODY_BYTES)
