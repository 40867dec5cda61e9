"""fakebase.py - shared machinery for the local fake payment providers.

Python 3 standard library only. Provides:
  * FakeServer: a ThreadingHTTPServer (HTTP/1.1, Content-Length, keep-alive, daemon
    threads) bound to 127.0.0.1, usable in-process (start() -> port, stop()) or from
    the command line (run_main), with one lock guarding all state;
  * request recording (every API request, with the status it was answered with);
  * failure injection (POST /_fake/fail), applied BEFORE the request is processed, so
    an injected failure never has a side effect;
  * the common control API under /_fake/ (reset, fail, requests, objects, config);
    subclasses add their own control endpoints through control().

A subclass implements handle(req) -> (status, body, headers), injected_error(mode)
-> (status, body, headers) and, optionally, reset_state(), configure(), control().
Handlers signal HTTP errors by raising FakeError.
"""

import argparse
import copy
import json
import random
import signal
import socket
import string
import struct
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits
_rng = random.SystemRandom()

FAIL_MODES = ("500", "429", "409", "timeout", "reset", "slow", "500_after")


def rand_id(n, alphabet=ALNUM):
    return "".join(_rng.choice(alphabet) for _ in range(n))


class FakeError(Exception):
    """An HTTP error answer raised by a handler.

    store=False marks an error raised before the endpoint started executing (auth,
    parameter validation, unknown resource): it is not kept under an idempotency key,
    so a retry with the same key runs again (Stripe documents exactly this)."""

    def __init__(self, status, body, headers=None, store=False):
        super().__init__(f"HTTP {status}")
        self.status, self.body, self.headers, self.store = status, body, headers or {}, store


def _split_key(key):
    i = key.find("[")
    if i <= 0 or not key.endswith("]"):
        return [key]
    return [key[:i]] + key[i + 1:-1].split("][")


def _listify(value):
    if isinstance(value, dict):
        value = {k: _listify(v) for k, v in value.items()}
        if value and all(k.isdigit() for k in value):
            return [value[k] for k in sorted(value, key=int)]
    return value


def parse_nested(qs):
    """Parse Stripe-style form/query text into nested dicts and lists:
    a[b][c]=1 -> {"a": {"b": {"c": "1"}}}; e[]=x&e[]=y and e[0]=x -> {"e": ["x", "y"]}.
    Values stay strings."""
    root = {}
    for key, value in parse_qsl(qs, keep_blank_values=True):
        parts = _split_key(key)
        cur = root
        for i, part in enumerate(parts):
            if part == "":
                part = str(len(cur))
            if i == len(parts) - 1:
                cur[part] = value
            else:
                nxt = cur.get(part)
                if not isinstance(nxt, dict):
                    nxt = cur[part] = {}
                cur = nxt
    return _listify(root)


class Request:
    """One parsed HTTP request."""

    def __init__(self, method, target, header_items, body):
        parts = urlsplit(target)
        self.method = method
        self.path = parts.path
        self.raw_query = parts.query
        self.query = parse_nested(parts.query)
        self.headers = {}
        for name, value in header_items:
            name = name.lower()
            self.headers[name] = f"{self.headers[name]}, {value}" if name in self.headers else value
        self.body = body
        self.text = body.decode("utf-8", "replace")
        ctype = self.headers.get("content-type", "")
        self.form = parse_nested(self.text) if "x-www-form-urlencoded" in ctype else {}
        self.delay = 0.0  # set by an injected "slow" rule

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        """The body as JSON (ValueError if malformed); an empty body is None."""
        if not self.body.strip():
            return None
        return json.loads(self.text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, app):
        self.app = app
        self._conns = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self):
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def version_string(self):
        return "fake-provider/1.0"

    def log_message(self, fmt, *args):
        if self.server.app.verbose:
            sys.stderr.write(f"[{self.server.app.name}] {fmt % args}\n")

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self):
        app = self.server.app
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        req = Request(self.command, self.path, self.headers.items(), body)
        resp = app.serve(req)
        if resp is None:  # injected "reset": drop the connection without answering
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close_connection = True
            return
        status, payload, headers = resp
        if not isinstance(payload, (bytes, bytearray)):
            payload = app.encode(payload)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = do_HEAD = _handle


class FakeServer:
    """Base class of the fakes. All mutable state is guarded by self.lock."""

    name = "fake"

    def __init__(self, host="127.0.0.1", port=0, verbose=False):
        self.host, self.port, self.verbose = host, port, verbose
        self.lock = threading.RLock()
        self._stopping = threading.Event()
        self._httpd = None
        self._thread = None
        self.reset()

    # ---- state -------------------------------------------------------------
    def reset(self):
        with self.lock:
            self.requests = []
            self.fail_rules = []
            self.objects = {}
            self.reset_state()

    def reset_state(self):
        pass

    def configure(self, data):
        raise FakeError(400, {"error": f"unknown config keys: {sorted(data)}"})

    def control(self, req, data):
        return None  # -> 404

    def encode(self, obj):
        return json.dumps(obj).encode()

    # ---- lifecycle ---------------------------------------------------------
    def start(self):
        """Serve in a background daemon thread; returns the bound port."""
        httpd = _Server((self.host, self.port), _Handler, self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._stopping.clear()
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"{self.name}-{self.port}", daemon=True)
        self._thread.start()
        return self.port

    def stop(self):
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # wakes injected timeouts and slow requests
        httpd.shutdown()
        httpd.close_all_connections()
        httpd.server_close()
        self._thread.join(5)

    @property
    def base_url(self):
        return f"http://{self.host}:{self.port}"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def pause(self, req):
        """Apply an injected "slow" delay (call it once the request holds its
        idempotency key, so concurrent same-key requests can be provoked)."""
        if req.delay:
            self._stopping.wait(req.delay)

    # ---- request pipeline --------------------------------------------------
    def serve(self, req):
        """Returns (status, body, headers), or None to drop the connection."""
        if req.path.startswith("/_fake/"):
            return self._serve_control(req)
        rec = {"method": req.method, "path": req.path, "query": req.query, "raw_query": req.raw_query,
               "headers": dict(req.headers), "body": req.text, "form": req.form, "status": None,
               "injected": None, "time": time.time()}
        with self.lock:
            self.requests.append(rec)
            rule = self._take_rule(req)
        if rule is not None:
            mode = rec["injected"] = rule["mode"]
            if mode == "reset":
                rec["status"] = 0
                return None
            if mode == "timeout":
                if self._stopping.wait(rule.get("seconds") or 30.0):
                    rec["status"] = 0
                    return None
                mode = "500"  # after the wait: an answer without side effect
            if mode == "slow":
                req.delay = float(rule.get("seconds") or 1.0)
            elif mode == "500_after":
                req.fail_after = True  # the endpoint runs; the answer is a 500 (Stripe stores it)
            else:
                status, body, headers = self.injected_error(mode)
                rec["status"] = status
                return status, body, headers
        try:
            status, body, headers = self.handle(req)
        except FakeError as e:
            status, body, headers = e.status, e.body, e.headers
        except Exception:  # a bug in the fake: say so loudly
            traceback.print_exc()
            status, body, headers = 500, {"error": {"type": "api_error", "message": "fake crashed"}}, {}
        rec["status"] = status
        return status, body, headers

    def _take_rule(self, req):
        for rule in self.fail_rules:
            if rule["path"] and rule["path"] not in req.path:
                continue
            if rule["method"] and rule["method"].upper() != req.method:
                continue
            rule["count"] -= 1
            if rule["count"] <= 0:
                self.fail_rules.remove(rule)
            return dict(rule)
        return None

    def _serve_control(self, req):
        hdrs = {}
        try:
            try:
                data = req.json() or {}
            except ValueError:
                raise FakeError(400, {"error": "control body must be JSON"})
            if not isinstance(data, dict):
                raise FakeError(400, {"error": "control body must be a JSON object"})
            with self.lock:
                out = self._control(req, data)
            if out is None:
                raise FakeError(404, {"error": f"unknown control endpoint {req.method} {req.path}"})
            return 200, out, hdrs
        except FakeError as e:
            return e.status, e.body, hdrs

    def _control(self, req, data):
        p, m = req.path, req.method
        if p == "/_fake/reset" and m == "POST":
            self.reset()
            return {"ok": True}
        if p == "/_fake/fail":
            if m == "GET":
                return copy.deepcopy(self.fail_rules)
            if m == "DELETE" or data.get("clear"):
                self.fail_rules = []
                return {"ok": True}
            mode = str(data.get("mode"))
            if mode not in FAIL_MODES:
                raise FakeError(400, {"error": f"mode must be one of {FAIL_MODES}"})
            count = data.get("count", 1)
            if not isinstance(count, int) or count < 1:
                raise FakeError(400, {"error": "count must be a positive integer"})
            rule = {"mode": mode, "count": count, "path": data.get("path") or None,
                    "method": data.get("method") or None, "seconds": data.get("seconds")}
            self.fail_rules.append(rule)
            return {"ok": True, "rule": rule}
        if p == "/_fake/requests":
            if m == "DELETE":
                self.requests = []
                return {"ok": True}
            sub = req.query.get("path")
            return [copy.deepcopy(r) for r in self.requests if not sub or sub in r["path"]]
        if p.startswith("/_fake/objects/") and m == "GET":
            obj = self.objects.get(p[len("/_fake/objects/"):])
            if obj is None:
                raise FakeError(404, {"error": "no such object"})
            return copy.deepcopy(obj)
        if p == "/_fake/config":
            if m == "POST" and data:
                self.configure(data)
            return self.config_view()
        return self.control(req, data)

    def config_view(self):
        return {}

    # ---- subclass interface ------------------------------------------------
    def handle(self, req):
        raise NotImplementedError

    def injected_error(self, mode):
        raise NotImplementedError


def run_main(make_app, parser: argparse.ArgumentParser, argv=None):
    """Command-line entry: start, print 'LISTENING <port>', serve until SIGTERM/SIGINT."""
    args = parser.parse_args(argv)
    app = make_app(args)
    port = app.start()
    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()
    while not done.wait(0.2):
        pass
    app.stop()
    return 0


def common_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    return parser
