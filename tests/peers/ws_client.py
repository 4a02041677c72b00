"""A WebSocket client on the `websockets` library: connects to the URL given, sends each
further argument as a message and prints each answer on a line; exits non-zero on any error."""
import sys
from websockets.sync.client import connect

url, messages = sys.argv[1], sys.argv[2:]
with connect(url, open_timeout=10, close_timeout=5) as ws:
    for m in messages:
        ws.send(m)
        print(ws.recv(timeout=10), flush=True)
