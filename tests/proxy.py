"""A loopback reverse proxy that splits a Synapse deployment by path, as nginx would.

Media paths go to the media workers (in turn), everything else to the main process. The
request line is forwarded byte for byte, because X-Matrix signatures cover it.

    python tests/proxy.py --port P [--tls CERT KEY] --main 127.0.0.1:M --media 127.0.0.1:W1,...
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys

from twisted.internet import reactor, ssl
from twisted.web import proxy, resource, server

MEDIA_PATH = re.compile(
    rb"^/_matrix/(media/|client/[^/]+(/org\.matrix\.[^/]+)?/media/|federation/[^/]+(/org\.matrix\.[^/]+)?/"
    rb"(media|remote_media)/)"
    rb"|^/_synapse/admin/v1/(media/|purge_media_cache|quarantine_media/|users?/[^/]+/media|room/[^/]+/media)"
)


class Splitter(resource.Resource):
    isLeaf = True

    def __init__(self, main: tuple[str, int], media: list[tuple[str, int]]):
        super().__init__()
        self.main = main
        self.media = itertools.cycle(media) if media else None

    def render(self, request: server.Request) -> object:
        host, port = self.main
        if self.media is not None and MEDIA_PATH.match(request.path):
            host, port = next(self.media)
        request.content.seek(0, 0)
        headers = request.getAllHeaders()
        factory = proxy.ProxyClientFactory(
            request.method, request.uri, request.clientproto, headers, request.content.read(), request
        )
        reactor.connectTCP(host, port, factory)
        return server.NOT_DONE_YET


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    p.add_argument("--main", required=True)
    p.add_argument("--media", default="")
    args = p.parse_args()
    media = [_addr(a) for a in args.media.split(",") if a]
    site = server.Site(Splitter(_addr(args.main), media))
    site.displayTracebacks = False
    if args.tls:
        cert, key = args.tls
        reactor.listenSSL(args.port, site, ssl.DefaultOpenSSLContextFactory(key, cert), interface="127.0.0.1")
    else:
        reactor.listenTCP(args.port, site, interface="127.0.0.1")
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
