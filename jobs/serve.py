"""``cdam serve DEST``: a local, read-only web dashboard over a run (local folder or s3://)."""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import socket
import sys

from cdam_worker.views.guard import WILDCARD_ADDRESSES, check_token, host_name
from jobs.command import add_run_command

EPILOG = """\
pages:
  /                  overview: model, targets, counts, errors, accuracy, the audit's class leaderboard
  /class/INDEX       every image of a class (paged), as input, heatmap or overlay; filters by
                     prediction, label, correctness and audit cluster; the audit's 2-D plot (drag a box
                     to select images) and the clusters' prototypes
  /image?key=KEY     every stored target's map and the attention map of one image, with its metadata

Colours: red = evidence for the class, blue = against; one symmetric scale per map. Views that need
`cdam audit DEST` say so until it has run. The server only reads the run and answers GET only.

who it answers:
  Host       only requests addressed to the bound address, localhost, 127.0.0.1 or [::1] at the server's
             port, or to a name given with --allow-host (a web page whose host name resolves to this
             machine gets a 403: no DNS rebinding); the same for the Origin of any request that has one.
             Binding 0.0.0.0 or ::, the machine's own names and addresses are not known to be safe: give
             each name others use to reach it with --allow-host (e.g. --allow-host "$(hostname -f)").
  token      off loopback (and on loopback with --token) the printed address carries a random token
             (?token=...); opening it once sets a cookie (HttpOnly, SameSite=Strict) and drops the token
             from the address; any request without the cookie or the token gets a 403. --token-file
             FILE keeps a fixed token; --no-auth turns the token off (anyone who reaches the port sees
             the run). Tokens are compared in constant time and never logged. On a machine others log
             in to, loopback is theirs too: add --token.

examples:
  cdam serve cdam-demo-output
  cdam serve s3://bucket/cdam/val --port 8080
  cdam serve s3://bucket/cdam/val --host 0.0.0.0 --allow-host gpu-box.example.org   # prints a tokened URL
  ssh -L 9000:localhost:8050 gpu-box   # then, there: cdam serve RUN --token --allow-host localhost:9000
"""


HELP = "a local web dashboard over a run"
DESCRIPTION = "Serve a read-only web dashboard over a run: overview, per-class galleries of every image, the audit's plots and prototypes, per-image maps."


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = add_run_command(commands, "serve", HELP, DESCRIPTION, EPILOG)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8050, help="port (default: 8050; 0 picks a free one)")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        type=_allowed_host,
        help="also answer requests addressed to NAME (a host name or address; NAME:PORT for another "
        "port, e.g. an ssh tunnel's); repeatable",
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--token", action="store_true", help="require a random token on loopback too (off loopback it is the default)"
    )
    auth.add_argument(
        "--token-file",
        metavar="FILE",
        help="require the token in FILE (16 or more of A-Z a-z 0-9 . _ ~ -) instead of a random one",
    )
    auth.add_argument(
        "--no-auth", action="store_true", help="no token even off loopback: anyone who can reach the port sees the run"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from cdam_worker.reading import open_run
    from cdam_worker.views.app import create_app

    token = token_of(args)
    run_ = open_run(args.output)
    for note in run_.skipped:
        print(f"note: {note}", file=sys.stderr)
    print(f"reading the index of {run_.url} ...", file=sys.stderr)
    app = create_app(run_, args.host, args.allow_host, token)
    if args.no_auth and not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host} with --no-auth: anyone who can reach this address can see the run",
            file=sys.stderr,
        )
    if args.host in WILDCARD_ADDRESSES and not args.allow_host:
        print(
            f"note: bound to {args.host} without --allow-host: only requests addressed to localhost, 127.0.0.1 or "
            "[::1] are answered; give --allow-host NAME for each name others use to reach this machine",
            file=sys.stderr,
        )
    listener = listen(args.host, args.port)
    port = listener.getsockname()[1]
    address = f"http://{_shown_host(args, port)}/"
    if token is None or args.token_file:
        opened = address + (f" (the token is in {args.token_file}: open {address}?token=TOKEN once)" if token else "")
    else:
        opened = f"{address}?token={token}"
    print(f"cdam serve: {opened} (Ctrl-C stops)", file=sys.stderr, flush=True)
    # no access log: a first request's address carries the token
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[listener])
    return 0


def token_of(args: argparse.Namespace) -> str | None:
    """The token requests must carry: None with --no-auth or on loopback without --token/--token-file, the
    one in --token-file, else a random one (RunError for a token file that cannot be used)."""
    from cdam_worker.reading import RunError

    if args.no_auth or (_is_loopback(args.host) and not (args.token or args.token_file)):
        return None
    if args.token_file is None:
        return secrets.token_urlsafe(32)
    try:
        with open(args.token_file, encoding="utf-8") as file:
            return check_token(file.read().strip(), f"--token-file {args.token_file}")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise RunError(f"--token-file {args.token_file}: cannot read it: {reason}") from None
    except ValueError as error:
        raise RunError(str(error)) from None


def _allowed_host(text: str) -> str:
    """An --allow-host value: a host name or address, with :PORT or not (no scheme, path or user)."""
    if not text or any(character in text for character in "/@?# \t") or text.endswith(":"):
        raise argparse.ArgumentTypeError(f"{text!r}: a host name or address, optionally with :PORT (no scheme or path)")
    return text


def _shown_host(args: argparse.Namespace, port: int) -> str:
    """The host and port of the printed address: the bound address, or for a wildcard the first --allow-host
    name (with its own port if it names one), else 127.0.0.1."""
    name = host_name(args.host)
    if args.host in WILDCARD_ADDRESSES:
        name = host_name(args.allow_host[0]) if args.allow_host else "127.0.0.1"
    return name if ":" in name.rpartition("]")[2] else f"{name}:{port}"


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
