"""Image bytes out of an HTTP request (raw body, multipart or base64 JSON), and the 4xx error for each bad one.

Every problem is a RequestError: an HTTP status, a short machine-readable kind and a message that names what
was wrong and how to send it instead. Image kinds are those training uses (retrain.data.images).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from retrain.data.images import (
    CORRUPT,
    DECOMPRESSION_BOMB,
    EMPTY,
    NOT_AN_IMAGE,
    TRUNCATED,
    UNOPENABLE,
    UNSUPPORTED,
)
from retrain.errors import DataError

HOW_TO_SEND = (
    "Fix: send the image as the raw body (curl -T photo.jpg URL), as multipart field `file` (curl -F file=@photo.jpg "
    'URL) or as JSON {"image": "<base64>"}'
)
_STATUS = {
    EMPTY: 400,
    NOT_AN_IMAGE: 415,
    UNSUPPORTED: 415,
    DECOMPRESSION_BOMB: 413,
    TRUNCATED: 422,
    CORRUPT: 422,
    UNOPENABLE: 422,
}


class RequestError(DataError):
    """A request (or one image of it) the server cannot answer, with the HTTP status that says so."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """The JSON error clients get."""
        return {"error": self.kind, "detail": str(self), "status": self.status}


def image_error(kind: str, detail: str) -> RequestError:
    """The 4xx for an image training could not read either (empty, not an image, truncated, bomb...)."""
    return RequestError(_STATUS.get(kind, 422), kind, f"Cannot read the image ({kind}): {detail.rstrip('.')}.")


def too_large(size: int, limit: int, what: str = "The body") -> RequestError:
    """413 for a body or file over serve.max_body_mb."""
    return RequestError(
        413,
        "too_large",
        f"{what} is {size / 2**20:.1f} MiB, over the server's limit of {limit / 2**20:.1f} MiB "
        "(serve.max_body_mb). Fix: send a smaller image, or start the server with a larger serve.max_body_mb.",
    )


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case ('' when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_raw_image_type(kind: str) -> bool:
    """Whether a content type announces raw image bytes: image/*, octet-stream, or none (what curl -T sends)."""
    return kind in ("", "application/octet-stream") or kind.startswith("image/")


async def single_image(request: Request) -> bytes:
    """The one image of a /predict request, whichever of the three forms it came in."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "no_file", f"The multipart form has no file field named `file`. {HOW_TO_SEND}.")
        return await upload.read()
    if kind == "application/json":
        return _from_json(await request.body())
    if is_raw_image_type(kind):
        data = await request.body()
        if not data:
            raise RequestError(400, EMPTY, f"The request body is empty. {HOW_TO_SEND}.")
        return data
    raise wrong_content_type(kind)


async def form_images(request: Request, max_files: int, max_bytes: int) -> list[tuple[str, bytes | RequestError]]:
    """(file name, bytes or the error of that part) for each file of a /predict/batch multipart request."""
    kind = media_type(request)
    if kind != "multipart/form-data":
        raise wrong_content_type(kind, batch=True)
    form = await request.form(max_files=max_files, max_fields=max_files)
    items: list[tuple[str, bytes | RequestError]] = []
    for field, value in form.multi_items():
        if not isinstance(value, UploadFile):
            items.append((field, RequestError(400, "not_a_file", f"Form field `{field}` is text, not a file.")))
            continue
        name = value.filename or field
        part_type = (value.content_type or "").split(";")[0].strip().lower()
        if value.size is not None and value.size > max_bytes:
            items.append((name, too_large(value.size, max_bytes, f"File {name}")))
        elif not is_raw_image_type(part_type):
            items.append((name, wrong_content_type(part_type, part=name)))
        else:
            data = await value.read()
            items.append((name, data or RequestError(400, EMPTY, f"File {name} is empty (0 bytes).")))
    if not items:
        raise RequestError(
            400, "no_file", "The multipart form holds no files. Fix: curl -F file=@a.jpg -F file=@b.jpg URL."
        )
    return items


def wrong_content_type(kind: str, *, batch: bool = False, part: str | None = None) -> RequestError:
    """415 naming the content type that was sent and the ones accepted."""
    what = f"File {part} is declared as" if part else "The request's Content-Type is"
    accepted = (
        "image/* or application/octet-stream parts"
        if part
        else "multipart/form-data with one or more image files"
        if batch
        else "image/*, application/octet-stream, multipart/form-data or application/json"
    )
    how = "Fix: curl -F file=@a.jpg -F file=@b.jpg URL" if batch or part else HOW_TO_SEND
    return RequestError(415, "wrong_content_type", f"{what} {kind!r}; expected {accepted}. {how}.")


def _from_json(body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, "bad_json", f"The JSON body cannot be parsed ({e}). {HOW_TO_SEND}.") from None
    text = payload.get("image") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise RequestError(
            400, "bad_json", 'The JSON body has no string field "image". Expected {"image": "<base64>"}.'
        )
    if text.startswith("data:") and "," in text:  # a data URL, as browsers' FileReader gives it
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, "bad_base64", f'The "image" field is not valid base64 ({e}).') from None
    if not data:
        raise RequestError(400, EMPTY, 'The "image" field is empty.')
    return data
