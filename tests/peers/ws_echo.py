"""A WebSocket echo app on the `websockets` library (its own HTTP/1.1 handshake, as a real
WebSocket server checks it: Upgrade, Connection, Sec-WebSocket-Key and -Version). Each
message comes back prefixed with `echo:`. Prints one JSON readiness line; the library's
debug log (each handshake's request and answer, timed) goes to stderr, the test's log."""
import json
import logging
import sys
from websockets.sync.server import serve


def echo(ws):
    for message in ws:
        ws.send(f"echo:{message}")


logging.basicConfig(
    stream=sys.stderr, level=logging.DEBUG, format="%(asctime)s %(name)s %(message)s"
)
with serve(echo, "127.0.0.1", 0) as server:
    host, port = server.socket.getsockname()[:2]
    print(json.dumps({"event": "ready", "addr": f"{host}:{port}"}), flush=True)
    server.serve_forever()
