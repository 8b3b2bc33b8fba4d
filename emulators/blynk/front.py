"""An HTTP answer as plain data (:class:`Reply`): what the device API's GET endpoints return.

aiohttp gets it as ``web.Response`` (:meth:`Reply.response`); plain data keeps the endpoints
free of aiohttp's response objects.
"""

from __future__ import annotations

from typing import NamedTuple

from aiohttp import web


class Reply(NamedTuple):
    """An HTTP answer as plain data: what the front writes, or :meth:`response` for aiohttp.

    ``headers`` come in wire order and include ``Content-Type`` whenever ``body`` is not empty
    (``Content-Length``, ``Date`` and ``Server`` are added when written).
    """

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=self.headers)
