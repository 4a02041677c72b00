"""An app on Python's standard http.server, as a real Python app is: it reads the request
target as the path (an absolute-form target is not a path it serves) and answers HTTP/1.1.
Routes: /hello answers 200 with what the request looked like, as JSON; anything else 404.
Prints one JSON readiness line."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if not self.path.startswith("/hello"):
            body = f"no route for {self.path}\n".encode()
            self.send_response(404)
        else:
            body = json.dumps({
                "app": "python",
                "method": self.command,
                "url": self.path,
                "hosts": self.headers.get_all("Host") or [],
                "version": self.request_version,
                "xfcc": self.headers.get("x-forwarded-client-cert"),
            }).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
host, port = server.server_address
print(json.dumps({"event": "ready", "addr": f"{host}:{port}"}), flush=True)
server.serve_forever()
