"""A server-first TCP app, as SMTP, MySQL or FTP servers are: it greets each connection with
`220 banner` before the client says anything, then echoes each line back. Prints one JSON
readiness line."""
import json
import socketserver


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"220 banner\r\n")
        self.wfile.flush()
        for line in self.rfile:
            self.wfile.write(line)
            self.wfile.flush()


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


with Server(("127.0.0.1", 0), Handler) as server:
    host, port = server.server_address
    print(json.dumps({"event": "ready", "addr": f"{host}:{port}"}), flush=True)
    server.serve_forever()
