"""A minimal OpenAI-compatible chat-completions server (standard library only).

Serves any ``generate_fn(messages, max_tokens, temperature) -> str`` at
``POST /v1/chat/completions`` (plus ``GET /v1/models``), so that an emolens model - steered or not -
can act as the LLM judge for :class:`~emolens.evaluate.judges.OpenAIJudge`, or be queried by any
OpenAI client. Requests are served one at a time (models are not thread-safe); it is meant for
local use on 127.0.0.1, has no authentication, and ignores streaming.

    url, stop = serve(model_generate_fn(emolens.load_model("smollm2-135m")))
    judge = OpenAIJudge(url, model="emolens")
    ...
    stop()
"""

from __future__ import annotations

import inspect
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from emolens.errors import InputError

__all__ = ["serve", "model_generate_fn", "GenerateFn"]

#: ``generate_fn(messages, max_tokens, temperature) -> reply text``
GenerateFn = Callable[[list, int, float], str]

_MAX_BODY = 8 * 1024 * 1024


def _error(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _make_handler(generate_fn: GenerateFn, model_name: str, lock: threading.Lock, default_max_tokens: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "emolens-chat/0.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. its timeout)
                self.close_connection = True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "emolens"}]})
            elif path in ("", "/health", "/v1"):
                self._send(200, {"status": "ok", "model": model_name})
            else:
                self._send(404, _error(f"unknown path {self.path}; use POST /v1/chat/completions", "not_found_error"))

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path not in ("/v1/chat/completions", "/chat/completions"):
                self._send(404, _error(f"unknown path {self.path}; use POST /v1/chat/completions", "not_found_error"))
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length <= 0 or length > _MAX_BODY:
                self._send(400, _error("request needs a JSON body with a valid Content-Length"))
                return
            raw = self.rfile.read(length)
            try:
                req = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                self._send(400, _error(f"body is not valid JSON: {e}"))
                return
            if not isinstance(req, dict):
                self._send(400, _error("body must be a JSON object"))
                return
            messages = req.get("messages")
            if (not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
                self._send(400, _error("'messages' must be a non-empty list of {'role': str, 'content': str}"))
                return
            try:
                max_tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or default_max_tokens)
                t_req = req.get("temperature")
                temperature = 1.0 if t_req is None else float(t_req)  # OpenAI default 1.0
            except (TypeError, ValueError):
                self._send(400, _error("'max_tokens' must be an int and 'temperature' a number"))
                return
            if max_tokens < 1 or temperature < 0:
                self._send(400, _error("'max_tokens' must be >= 1 and 'temperature' >= 0"))
                return
            msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
            try:
                with lock:
                    text = generate_fn(msgs, max_tokens, temperature)
                if not isinstance(text, str):
                    raise TypeError(f"generate_fn returned {type(text).__name__}, not str")
            except Exception as e:  # report, don't kill the server
                self._send(500, _error(f"generation failed: {type(e).__name__}: {e}", "server_error"))
                return
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(req.get("model") or model_name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            })

    return Handler


def serve(
    generate_fn: GenerateFn,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str = "emolens",
    default_max_tokens: int = 256,
) -> tuple[str, Callable[[], None]]:
    """Serve ``generate_fn`` as an OpenAI-compatible chat endpoint in a background thread.

    Args:
        generate_fn: ``generate_fn(messages, max_tokens, temperature) -> str``; ``messages`` is a
            list of ``{"role", "content"}`` dicts. Calls are serialised with a lock.
        host: interface to bind (default loopback only).
        port: TCP port; 0 picks a free one.
        model_name: the id reported by ``/v1/models`` and echoed when a request names none.

    Returns:
        ``(url, stop)``: ``url`` is the base URL ending in ``/v1`` (give it to
        :class:`~emolens.evaluate.judges.OpenAIJudge` or any OpenAI client); ``stop()`` shuts the
        server down and frees the port (safe to call twice).
    """
    if not callable(generate_fn):
        raise InputError(f"serve(): generate_fn must be callable, got {type(generate_fn).__name__}")
    lock = threading.Lock()
    httpd = ThreadingHTTPServer((host, int(port)), _make_handler(generate_fn, model_name, lock, default_max_tokens))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"emolens-serve-{httpd.server_address[1]}", daemon=True)
    thread.start()
    bound_host, bound_port = httpd.server_address[:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    url = f"http://{shown}:{bound_port}/v1"
    stopped = threading.Event()

    def stop() -> None:
        if stopped.is_set():
            return
        stopped.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)

    return url, stop


def model_generate_fn(model: Any, **generate_kwargs: Any) -> GenerateFn:
    """Adapt an emolens model to a ``generate_fn`` for :func:`serve`.

    ``model`` is an object with ``generate([messages], max_new_tokens=N, ...) -> list[str]`` (what
    ``emolens.load_model(name)`` returns), or a model name, which is loaded with
    ``emolens.load_model``. ``temperature`` is forwarded only when the model's ``generate`` names a
    ``temperature`` parameter (otherwise the model decodes as it defaults to, e.g. greedily); extra ``generate_kwargs`` (e.g. steering options) are passed
    through on every call.
    """
    if isinstance(model, str):
        import emolens  # lazy: the evaluation package must not need the core at import time

        model = emolens.load_model(model)
    gen = getattr(model, "generate", None)
    if not callable(gen):
        raise InputError(f"model_generate_fn(): {type(model).__name__} has no generate(); pass emolens.load_model(name)")
    try:
        params = inspect.signature(gen).parameters
        takes_temperature = "temperature" in params  # not via **kwargs: it may reach code that rejects it
    except (TypeError, ValueError):
        takes_temperature = False

    def generate_fn(messages: list, max_tokens: int, temperature: float) -> str:
        kwargs = dict(generate_kwargs)
        if takes_temperature and "temperature" not in kwargs:
            kwargs["temperature"] = temperature
        out = gen([messages], max_new_tokens=max_tokens, **kwargs)
        if isinstance(out, str):
            return out
        return str(out[0])

    return generate_fn
