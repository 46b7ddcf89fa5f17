"""A TLS reverse proxy that puts only the SuperLink's Fleet API on the public interface (flwr 1.42).

flwr 1.42's SuperLink serves its Fleet API (SuperNodes), Control API (`flwr run`, `flwr supernode
register`, ...) and Runtime API (its own ServerApp) on ONE HTTP port (`--host`/`--port`;
`--control-api-address` is deprecated and does not move the HTTP Control API), and the open-source Control
API has no account authentication. Whoever reaches that port can therefore register a SuperNode key and
ship code every site runs. So: bind the SuperLink to 127.0.0.1 and expose this proxy instead, which
forwards ``/v1/fleet/*`` (and ``/health``) and answers 403 to everything else:

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key \\
        --enable-supernode-auth --host 127.0.0.1 --port 9190 ...
    python scripts/fleet_proxy.py --listen 0.0.0.0:9191 --upstream 127.0.0.1:9190 \\
        --certfile server.crt --keyfile server.key --cafile ca.crt

Sites then use ``--superlink coordinator.example.org:9191``; `flwr` runs on the coordinator itself against
127.0.0.1:9190. The proxy terminates TLS with the SuperLink's certificate (it must name the public
address) and re-encrypts to the SuperLink, verifying it with ``--cafile``. SuperNode authentication is
end to end: the signed headers pass through unchanged and the SuperLink checks them.
"""

from __future__ import annotations

import argparse
import logging

import httpx
import uvicorn

ALLOWED_PREFIXES = ("/v1/fleet/",)
ALLOWED_PATHS = ("/health",)
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
}

logger = logging.getLogger("fleet_proxy")


def allowed(path: str) -> bool:
    """Whether a request path belongs to the Fleet API (or the health check)."""
    return path in ALLOWED_PATHS or any(path.startswith(prefix) for prefix in ALLOWED_PREFIXES)


def make_app(upstream: str, cafile: str | None):
    """An ASGI app forwarding allowed paths to ``https://<upstream>`` (``http://`` if no ``cafile``)."""
    scheme = "https" if cafile else "http"
    client = httpx.AsyncClient(
        base_url=f"{scheme}://{upstream}", verify=cafile if cafile else False, timeout=None
    )

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if not allowed(path):
            logger.warning("refused %s %s from %s", scope["method"], path, scope.get("client"))
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-length", b"9")]})
            await send({"type": "http.response.body", "body": b"forbidden"})
            return
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP]
        url = path + (("?" + scope["query_string"].decode("latin-1")) if scope.get("query_string") else "")
        response = await client.request(scope["method"], url, headers=headers, content=body)
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"
        ]
        content = response.content
        out_headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
        await send({"type": "http.response.body", "body": content})

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--listen", required=True, help="host:port to serve the Fleet API on (public)")
    parser.add_argument("--upstream", required=True, help="the SuperLink's host:port (loopback)")
    parser.add_argument("--certfile", required=True, help="TLS certificate for --listen")
    parser.add_argument("--keyfile", required=True, help="its private key")
    parser.add_argument(
        "--cafile", help="CA certificate to verify the SuperLink (omit for an --insecure one)"
    )
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    logging.basicConfig(level=logging.INFO)
    uvicorn.run(
        make_app(args.upstream, args.cafile),
        host=host,
        port=int(port),
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
        log_level="info",
        lifespan="on",
    )


if __name__ == "__main__":
    main()
