"""Issue 18 §3: one seam for the image path, where a security context plugs in.

``fota.transport.image.image_fetcher`` picks the fetcher for the update client
(``CoapTransport.block_fetcher``) and for ``fota fetch`` alike. A security context that
carries the requests itself (OSCORE today, DTLS next) plugs in there as ``secured``, not
beside it in each caller.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from fota.transport.image import ImageSettings, image_fetcher

ROOT = Path(__file__).resolve().parents[2] / "fota"


class Context:
    def __init__(self) -> None:
        self.asked: list[tuple[str, int, int]] = []

    def secured_fetcher(self, uri: str, *, window: int, block_size: int) -> Any:
        self.asked.append((uri, window, block_size))
        return self


def test_a_secured_context_carries_every_image_uri_it_is_given() -> None:
    context = Context()
    for uri in ("coap://h/img", "coap+tcp://h/img"):
        got: Any = image_fetcher(
            uri, window=8, block_size=512, settings=ImageSettings(), secured=context
        )
        assert got is context
    assert context.asked == [("coap://h/img", 8, 512), ("coap+tcp://h/img", 8, 512)]


def test_the_client_and_fota_fetch_pick_their_fetcher_at_the_one_seam() -> None:
    for module in ("transport/coap.py", "fetch.py"):
        tree = ast.parse((ROOT / module).read_text())
        calls = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        constructed = {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        }
        assert "image_fetcher" in calls, module
        # Neither builds a fetcher of its own beside the seam.
        assert not {"WindowFetcher", "TcpFetcher"} & calls, module
        assert "for_uri" not in constructed, module
