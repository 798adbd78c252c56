"""Errors a request can cause, each carrying the request field at fault (`param`, a dotted path
such as `messages.2.content`), so that a server names the field without reading the message."""

from __future__ import annotations


class RequestError(ValueError):
    """A request that cannot be served as asked: a 400 naming `param` on the server."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class ContextLengthExceeded(RequestError):
    """The prompt, with the tokens asked for, does not fit; the caller knows which field holds it."""

    def __init__(self, message: str):
        super().__init__(message, code="context_length_exceeded")
