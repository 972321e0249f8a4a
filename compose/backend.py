"""A demo backend: registers itself with the Consul agent, then answers with its name.

Environment: NAME (answer text), PORT (listen port), CONSUL (agent URL),
WEIGHT (Consul Weights.Passing). Deregisters on SIGTERM.
"""
import json
import os
import signal
import socket
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = os.environ.get("NAME", socket.gethostname())
PORT = int(os.environ.get("PORT", "8080"))
CONSUL = os.environ.get("CONSUL", "http://consul:8500")
WEIGHT = int(os.environ.get("WEIGHT", "1"))
ADDRESS = socket.gethostbyname(socket.gethostname())


def consul(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(CONSUL + path, data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def register():
    body = {
        "ID": NAME,
        "Name": "web",
        "Address": ADDRESS,
        "Port": PORT,
        "Weights": {"Passing": WEIGHT, "Warning": 1},
        "Check": {"HTTP": f"http://{ADDRESS}:{PORT}/", "Interval": "2s", "Timeout": "1s"},
    }
    for _ in range(60):
        try:
            consul("PUT", "/v1/agent/service/register", body)
            print(f"{NAME}: registered {ADDRESS}:{PORT} with Consul", flush=True)
            return
        except OSError as e:
            print(f"{NAME}: waiting for Consul: {e}", flush=True)
            time.sleep(1)
    sys.exit(f"{NAME}: could not register with Consul")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = (NAME + "\n").encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-backend", NAME)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def stop(*_):
    try:
        consul("PUT", f"/v1/agent/service/deregister/{NAME}")
    finally:
        sys.exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop)
    server = ThreadingHTTPServer(("0.0.0.0", PORT), Handler)
    register()
    server.serve_forever()
