"""An API outside the mesh, over TLS with a CA of its own (the test's): Python's http.server
behind the standard ssl module, as a stand-in for a payments or partner API. Arguments: the
server certificate and key (PEM), then optionally a CA whose client certificates it requires.
Routes: /hello answers 200 with what it saw, as JSON (path, Host, the SNI the client sent,
the ALPN protocol, the client certificate's subject CN, the HTTP version); /flaky/<key>
answers 503 the first time per key, then 200; /stall/<ms> answers after that long; anything
else 404. Prints one JSON readiness line."""
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

cert, key = sys.argv[1], sys.argv[2]
client_ca = sys.argv[3] if len(sys.argv) > 3 else None
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["http/1.1"])
if client_ca:
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_ca)


def remember_sni(sock, name, _ctx):
    sock.mesh_sni = name


ctx.sni_callback = remember_sni
flaky = set()
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body, ctype="text/plain"):
        data = body.encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        conn = self.connection
        if self.path.startswith("/hello"):
            peer = conn.getpeercert() or {}
            cn = None
            for rdn in peer.get("subject", ()):
                for k, v in rdn:
                    if k == "commonName":
                        cn = v
            self.answer(200, json.dumps({
                "app": "tls-api",
                "url": self.path,
                "host": self.headers.get("Host"),
                "sni": getattr(conn, "mesh_sni", None),
                "alpn": conn.selected_alpn_protocol(),
                "client_cn": cn,
                "version": self.request_version,
            }), "application/json")
        elif self.path.startswith("/flaky/"):
            with lock:
                first = self.path not in flaky
                flaky.add(self.path)
            self.answer(503 if first else 200, "first try fails\n" if first else "ok\n")
        elif self.path.startswith("/stall/"):
            time.sleep(int(self.path[len("/stall/"):]) / 1000)
            self.answer(200, "late\n")
        else:
            self.answer(404, f"no route for {self.path}\n")

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
host, port = server.server_address
print(json.dumps({"event": "ready", "addr": f"{host}:{port}"}), flush=True)
server.serve_forever()
