"""``cdam serve DEST``: a local, read-only web dashboard over a run (local folder or s3://)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

EPILOG = """\
pages:
  /                  overview: model, targets, counts, errors, accuracy, the audit's class leaderboard
  /class/INDEX       every image of a class (paged), as input, heatmap or overlay; filters by
                     prediction, label, correctness and audit cluster; the audit's 2-D plot (drag a box
                     to select images) and the clusters' prototypes
  /image?key=KEY     every stored target's map and the attention map of one image, with its metadata

Colours: red = evidence for the class, blue = against; one symmetric scale per map. Views that need
`cdam audit DEST` say so until it has run. The server only reads the run; it binds 127.0.0.1 unless
--host says otherwise (it has no authentication: bind another address only on a trusted network).

examples:
  cdam serve cdam-demo-output
  cdam serve s3://bucket/cdam/val --port 8080
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="a local web dashboard over a run", description="Serve a read-only web dashboard over a run: overview, per-class galleries of every image, the audit's plots and prototypes, per-image maps.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", metavar="DEST", help="the run: output folder or s3://bucket/prefix")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8050, help="port (default: 8050; 0 picks a free one)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cdam_worker.reading import open_run
    from cdam_worker.views.app import create_app

    run_ = open_run(args.output)
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    print(f"reading the index of {run_.url} ...", file=sys.stderr)
    app = create_app(run_)
    if not _is_loopback(args.host):
        print(f"warning: serving on {args.host}: anyone who can reach this address can see the run (no authentication)", file=sys.stderr)
    listener = listen(args.host, args.port)
    port = listener.getsockname()[1]
    shown = f"[{args.host}]" if listener.family == socket.AF_INET6 else args.host
    print(f"cdam serve: http://{shown}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[listener])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (RunError if it cannot be had). It is made with
    ``IPPROTO_TCP`` named: asyncio turns Nagle's algorithm off only on sockets that say they are TCP, and
    with it on, every response after the first on a kept-alive connection waited 40 ms for the client's
    delayed ACK (a gallery's 48 tiles over a browser's 6 connections: 0.3 s)."""
    from cdam_worker.reading import RunError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)  # before the address is announced: connections wait until the app serves them
    except OSError as error:
        listener.close()
        raise RunError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
