"""A WebSocket client on the `websockets` library: connects to the URL given, sends each
further argument as a message and prints each answer on a line; exits non-zero on any error.
With WS_CONNECT=HOST:PORT it dials that address instead of the URL's host (which still names
the server: Host, and SNI for wss://), and with WS_CA=FILE it trusts that CA for wss://.
The library's debug log (the handshake's request and answer, timed) goes to stderr, so a
failure shows how far the connection got."""
import logging
import os
import socket
import ssl
import sys
from websockets.sync.client import connect

logging.basicConfig(
    stream=sys.stderr, level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s"
)
url, messages = sys.argv[1], sys.argv[2:]
kw = {}
if os.environ.get("WS_CONNECT"):
    host, port = os.environ["WS_CONNECT"].rsplit(":", 1)
    kw["sock"] = socket.create_connection((host, int(port)), timeout=10)
if os.environ.get("WS_CA"):
    kw["ssl"] = ssl.create_default_context(cafile=os.environ["WS_CA"])
with connect(url, open_timeout=10, close_timeout=5, **kw) as ws:
    for m in messages:
        ws.send(m)
        print(ws.recv(timeout=10), flush=True)
