"""The e2e harness: migrates a database the suite owns, starts `orderd serve` on a free
loopback port with test secrets, loads test products through the API, and stops the
server with SIGTERM at the end, expecting exit code 0 (graceful shutdown is tested too).

Environment:
  ORDERD_BIN          the binary (default <repo>/build/orderd)
  ORDERD_REPO         the checkout (default: two levels up from here)
  ORDERD_E2E_PG_DSN   the suite's database (default host=127.0.0.1 port=55432
                      dbname=orderd_e2e user=orderd); created if missing
  ORDERD_E2E_REDIS    the session's Redis, host:port (default 127.0.0.1:56379, the
                      stack's); when nothing answers there, the suite starts a private
                      redis-server on a free port for the session
The session also starts the local fakes of Stripe and PayPal (tests/fakes) and points
orderd at them, opens orderd's HTTP side port (webhooks, /metrics) on a free port, and
gives orderd an AMQP exchange and queues of its own on the stack's RabbitMQ
(ORDERD_E2E_AMQP, host:port, default 127.0.0.1:55672), named e2e-<random>.*.
The session's orderd runs with its cache and rate limits on, limits high enough never to
refuse (100000/100000 for every role, no overrides), and a key prefix of its own
(e2e-<random>:), so runs never see each other's keys; its keys are deleted at the end.
Tests that kill or stop Redis start their own redis-server and orderd (test_cache.py).
Tests never truncate: every test uses its own customers, request ids and, where it
changes them, its own products, so tests are independent and runs can repeat.
"""

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import uuid

import pytest

import orderd_e2e as e2e
from orderd_e2e import pb

_SESSION = {}


def _ensure_database(dsn):
    """Creates the DSN's database through psql if it does not exist yet."""
    probe = subprocess.run(["psql", dsn, "-XtAc", "select 1"], capture_output=True, text=True)
    if probe.returncode == 0:
        return
    if "does not exist" not in probe.stderr:
        pytest.exit("e2e database unreachable (%s): %s\nStart the stack (scripts/stack.sh "
                    "start) or set ORDERD_E2E_PG_DSN." % (dsn, probe.stderr.strip()), 2)
    m = re.search(r"dbname=(\S+)", dsn)
    dbname = m.group(1)
    admin_dsn = re.sub(r"dbname=\S+", "dbname=postgres", dsn)
    r = subprocess.run(["psql", admin_dsn, "-Xv", "ON_ERROR_STOP=1", "-c",
                        'CREATE DATABASE "%s"' % dbname], capture_output=True, text=True)
    if r.returncode != 0 and "already exists" not in r.stderr:
        pytest.exit("cannot create %s: %s" % (dbname, r.stderr.strip()), 2)


STRIPE_KEY = "sk_test_fake"
STRIPE_WEBHOOK_SECRET = "whsec_e2e_" + "0123456789abcdef" * 2
PAYPAL_CLIENT_ID = "e2e-client"
PAYPAL_SECRET = "e2e-secret-" + "x" * 21
PAYPAL_WEBHOOK_ID = "WH-E2E-1"


class FakeProvider:
    """A fake provider process (tests/fakes/fake_*.py) on a free loopback port."""

    def __init__(self, script, args, logdir, name):
        self.name = name
        self.log_path = os.path.join(logdir, name + ".log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", os.path.join(e2e.REPO, "tests", "fakes", script), "--port",
             "0"] + list(args), stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("LISTENING "):
            self.proc.kill()
            raise RuntimeError("%s did not start: %r (see %s)" % (name, line, self.log_path))
        self.port = int(line.split()[1])
        self.base = "http://127.0.0.1:%d" % self.port

    def control(self, path, body=None, method=None):
        """Calls the fake's control API (/_fake/...); returns the decoded JSON answer."""
        import json
        import urllib.request
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data,
                                     method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Caller:
    def __init__(self, sub, roles, token):
        self.sub = sub
        self.roles = roles
        self.token = token

    def __repr__(self):
        return "Caller(%s, %s)" % (self.sub, self.roles)


class E2E:
    """What the tests get: the running server, an Api on it, tokens and products."""

    def __init__(self, server, env, secret, page_secret, logdir, redis, stripe=None,
                 paypal=None):
        self.server = server
        self.stripe = stripe
        self.paypal = paypal
        self.http_base = "http://127.0.0.1:%s" % env.get("ORDERD_HTTP_LISTEN", ":").rsplit(
            ":", 1)[1]
        self.amqp_exchange = env.get("ORDERD_AMQP_EXCHANGE")
        self.env = env
        self.secret = secret
        self.page_secret = page_secret
        self.logdir = logdir
        self.redis_host, self.redis_port = redis
        self.key_prefix = env["ORDERD_CACHE_KEY_PREFIX"]
        self.api = e2e.Api(server.channel)
        self.admin = self.caller("e2e-admin", ["admin"])
        self.service = self.caller("e2e-checkout", ["service"])
        self.run = uuid.uuid4().hex[:8]
        self.products = {}

    def redis_scan(self, pattern):
        """Keys of the session's Redis matching `pattern`."""
        return e2e.redis_scan(self.redis_host, self.redis_port, pattern)

    def cached_keys(self, order_id):
        """The session server's cache keys of an order ("<prefix>o:<epoch>:<id>")."""
        return self.redis_scan(e2e.order_key_pattern(self.key_prefix, order_id))

    @contextlib.contextmanager
    def instance(self, name, env=None):
        """Another `orderd serve` on the suite's database with the session's settings
        changed by `env` (ORDERD_* variables; a fresh cache key prefix unless given).
        Yields the e2e.Orderd once it is SERVING; on leaving, SIGTERM and exit code 0."""
        full = dict(self.env)
        full["ORDERD_CACHE_KEY_PREFIX"] = "e2e-%s:" % uuid.uuid4().hex[:12]
        full.update(env or {})
        keep_http = "ORDERD_HTTP_LISTEN" in (env or {})
        srv = e2e.Orderd(full, self.logdir, "%s-%s" % (name, uuid.uuid4().hex[:6]),
                         keep_http=keep_http).start()
        try:
            srv.wait_health(e2e.health_pb2.HealthCheckResponse.SERVING, timeout=20)
            srv.api = e2e.Api(srv.channel)
            srv.key_prefix = full["ORDERD_CACHE_KEY_PREFIX"]
            yield srv
        except BaseException:
            srv.stop(timeout=15)
            raise
        rc = srv.stop(timeout=15)
        assert rc == 0, "%s did not exit 0 after SIGTERM (rc=%s)\n%s" % (
            srv.name, rc, srv.log_tail())

    # -- callers
    def caller(self, sub, roles):
        return Caller(sub, roles, e2e.mint(self.secret, sub, roles))

    def customer(self):
        return self.caller(e2e.unique("cust"), ["customer"])

    # -- calls
    def call(self, method, request, caller, **kw):
        token = caller.token if isinstance(caller, Caller) else caller
        return self.api.call(method, request, token, **kw)

    def place_request(self, items, request_id=None, customer_id="",
                      provider=pb.PAYMENT_PROVIDER_LOCAL):
        return pb.PlaceOrderRequest(
            request_id=request_id if request_id is not None else e2e.unique("req"),
            customer_id=customer_id,
            items=[pb.LineItem(product_id=p, quantity=q) for p, q in items],
            payment_provider=provider)

    def place(self, caller, items, **kw):
        return self.call("PlaceOrder", self.place_request(items, **kw), caller)

    def get(self, caller, order_id):
        return self.call("GetOrder", pb.GetOrderRequest(order_id=order_id), caller)

    def list_all(self, caller, page_size=0, statuses=(), customer_id=""):
        """Every order the caller can list, following next_page_token."""
        out, token, pages = [], "", 0
        while True:
            r = self.call("ListOrders", pb.ListOrdersRequest(
                page_size=page_size, page_token=token, statuses=list(statuses),
                customer_id=customer_id), caller)
            out.extend(r.orders)
            pages += 1
            assert pages < 10000, "pagination does not end"
            if not r.next_page_token:
                return out
            token = r.next_page_token

    def order_ids(self, caller, **kw):
        return [o.order_id for o in self.list_all(caller, **kw)]

    def upsert(self, product_id, name, price, currency, active=True):
        return self.call("UpsertProduct", pb.UpsertProductRequest(product=pb.Product(
            product_id=product_id, name=name, unit_price_minor=price, currency=currency,
            active=active)), self.admin)

    def pid(self, key):
        return self.products[key].product_id


# name, price, currency, active
_PRODUCTS = {
    "widget": ("Widget", 1000, "EUR", True),
    "gadget": ("Gadget", 2000, "EUR", True),
    "penny": ("Penny sweet", 1, "EUR", True),
    "yen": ("Matcha tin", 500, "JPY", True),
    "inactive": ("Discontinued lamp", 300, "EUR", False),
    # total = subtotal + round_half_up(subtotal * 825 / 10000): 92378752 -> 99999999 (the
    # configured max_total_minor), 92378753 -> 100000000 (one above).
    "max_ok": ("Boat, at the limit", 92378752, "EUR", True),
    "max_over": ("Boat, one cent over", 92378753, "EUR", True),
}
BULK = 101


def _session_redis(logdir):
    """(host, port, RedisServer or None): ORDERD_E2E_REDIS when it answers, else a private
    redis-server started for the session."""
    spec = os.environ.get("ORDERD_E2E_REDIS", "127.0.0.1:56379")
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        pytest.exit("ORDERD_E2E_REDIS must be host:port, not %r" % spec, 2)
    if e2e.redis_ping(host, int(port), timeout=1.0):
        return host, int(port), None
    if not shutil.which("redis-server"):
        pytest.exit("no Redis at %s and no redis-server to start one" % spec, 2)
    own = e2e.RedisServer(logdir, "redis-session").start()
    return own.host, own.port, own


def _drop_keys(host, port, prefix):
    """Deletes the session's keys from a shared Redis (best effort)."""
    try:
        keys = e2e.redis_scan(host, port, prefix + "*")
        for i in range(0, len(keys), 500):
            e2e.redis_cli(host, port, "DEL", *keys[i:i + 500])
    except Exception as e:  # noqa: BLE001 - clean-up only
        print("could not delete the session's Redis keys (%s*): %s" % (prefix, e))


def _drop_broker_topology(host, port, tag):
    """Best effort: the session's queues and exchanges (e2e-<tag>.*), so that a developer's
    broker does not collect a set of durable queues, messages and all, per run."""
    try:
        import pika
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host=host, port=port, credentials=pika.PlainCredentials("guest", "guest"),
            socket_timeout=3, blocked_connection_timeout=5, connection_attempts=1))
    except Exception:  # noqa: BLE001 - clean-up only
        return
    with contextlib.closing(conn):
        for kind, names in (("queue", ("stock", "orders", "replies", "dead-letter")),
                            ("exchange", ("events", "dead-letter"))):
            for n in names:
                with contextlib.suppress(Exception):
                    ch = conn.channel()
                    (ch.queue_delete if kind == "queue" else ch.exchange_delete)("e2e-%s.%s" % (tag, n))


@pytest.fixture(scope="session")
def orderd():
    if not (os.path.isfile(e2e.BIN) and os.access(e2e.BIN, os.X_OK)):
        pytest.exit("orderd binary not found at %s (build it, or set ORDERD_BIN)" % e2e.BIN, 2)
    _ensure_database(e2e.PG_DSN)
    secret = secrets.token_hex(48)
    page_secret = secrets.token_hex(32)
    env = e2e.base_env(e2e.PG_DSN, secret, page_secret)
    logdir = tempfile.mkdtemp(prefix="orderd-e2e-")
    redis_host, redis_port, own_redis = _session_redis(logdir)
    tag = uuid.uuid4().hex[:12]
    prefix = "e2e-%s:" % tag
    stripe = FakeProvider("fake_stripe.py", ["--key", STRIPE_KEY], logdir, "fake-stripe")
    paypal = FakeProvider("fake_paypal.py", ["--client-id", PAYPAL_CLIENT_ID, "--client-secret",
                                             PAYPAL_SECRET, "--webhook-id", PAYPAL_WEBHOOK_ID],
                          logdir, "fake-paypal")
    _SESSION["fakes"] = (stripe, paypal)
    amqp_host, _, amqp_port = os.environ.get("ORDERD_E2E_AMQP", "127.0.0.1:55672").rpartition(":")
    env.update({
        "ORDERD_PAYMENTS_LOCAL_ENABLED": "true",
        "ORDERD_PAYMENTS_STRIPE_ENABLED": "true",
        "ORDERD_PAYMENTS_STRIPE_API_BASE": stripe.base,
        "ORDERD_PAYMENTS_STRIPE_SECRET_KEY": STRIPE_KEY,
        "ORDERD_PAYMENTS_STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
        "ORDERD_PAYMENTS_PAYPAL_ENABLED": "true",
        "ORDERD_PAYMENTS_PAYPAL_API_BASE": paypal.base,
        "ORDERD_PAYMENTS_PAYPAL_CLIENT_ID": PAYPAL_CLIENT_ID,
        "ORDERD_PAYMENTS_PAYPAL_CLIENT_SECRET": PAYPAL_SECRET,
        "ORDERD_PAYMENTS_PAYPAL_WEBHOOK_ID": PAYPAL_WEBHOOK_ID,
        "ORDERD_PAYMENTS_TIMEOUT": "3s",
        "ORDERD_PAYMENTS_BACKOFF_BASE": "50ms",
        "ORDERD_PAYMENTS_BACKOFF_MAX": "200ms",
        # The production default (5ms) lets a loaded CI machine running an ASan build skip
        # a cache fill now and then, which the cache tests would read as a missing entry.
        # What a slow or dead Redis does is tested on instances of their own, at 5ms.
        "ORDERD_REDIS_TIMEOUT": "250ms",
        "ORDERD_HTTP_LISTEN": "127.0.0.1:%d" % e2e.free_port(),
        "ORDERD_AMQP_ENABLED": "true",
        "ORDERD_AMQP_HOST": amqp_host,
        "ORDERD_AMQP_PORT": amqp_port,
        "ORDERD_AMQP_EXCHANGE": "e2e-%s.events" % tag,
        "ORDERD_AMQP_STOCK_QUEUE": "e2e-%s.stock" % tag,
        "ORDERD_AMQP_ORDER_QUEUE": "e2e-%s.orders" % tag,
        "ORDERD_AMQP_REPLY_QUEUE": "e2e-%s.replies" % tag,
        "ORDERD_AMQP_DEAD_LETTER_EXCHANGE": "e2e-%s.dead-letter" % tag,
        "ORDERD_AMQP_DEAD_LETTER_QUEUE": "e2e-%s.dead-letter" % tag,
        "ORDERD_AMQP_RELAY_IDLE_POLL": "200ms",
        "ORDERD_AMQP_RELAY_RETRY_MAX": "2s",
        "ORDERD_AMQP_TIMEOUT": "3s",
        "ORDERD_AMQP_RECONNECT_BACKOFF_MAX": "1s",
    })
    env.update({
        "ORDERD_REDIS_HOST": redis_host,
        "ORDERD_REDIS_PORT": str(redis_port),
        "ORDERD_CACHE_ENABLED": "true",
        "ORDERD_CACHE_KEY_PREFIX": prefix,
        "ORDERD_RATELIMIT_ENABLED": "true",
        "ORDERD_RATELIMIT_CUSTOMER": "100000/100000",
        "ORDERD_RATELIMIT_SERVICE": "100000/100000",
        "ORDERD_RATELIMIT_ADMIN": "100000/100000",
        "ORDERD_RATELIMIT_OVERRIDES": "",
        "ORDERD_RATELIMIT_REPLICAS": "1",
    })

    mig = e2e.run_cli(["migrate"], env, timeout=120)
    assert mig.returncode == 0, "orderd migrate failed (%d)\nstdout:\n%s\nstderr:\n%s" % (
        mig.returncode, mig.stdout, mig.stderr)

    server = e2e.Orderd(env, logdir, "orderd-main", keep_http=True).start()
    _SESSION["server"] = server
    try:
        server.wait_health(e2e.health_pb2.HealthCheckResponse.SERVING, timeout=20)
        ctx = E2E(server, env, secret, page_secret, logdir, (redis_host, redis_port), stripe,
                  paypal)
        for key, (name, price, cur, active) in _PRODUCTS.items():
            pid = "e2e-%s-%s" % (ctx.run, key.replace("_", "-"))
            ctx.products[key] = ctx.upsert(pid, name, price, cur, active)
        for i in range(BULK):
            key = "bulk%03d" % i
            ctx.products[key] = ctx.upsert("e2e-%s-bulk-%03d" % (ctx.run, i),
                                           "Bulk item %d" % i, 1, "EUR")
    except BaseException:
        server.kill()
        if own_redis:
            own_redis.kill()
        stripe.stop()
        paypal.stop()
        raise

    yield ctx

    rc = server.stop(timeout=15)
    _SESSION.pop("server", None)
    stripe.stop()
    paypal.stop()
    _SESSION.pop("fakes", None)
    if own_redis:
        own_redis.kill()
    else:
        _drop_keys(redis_host, redis_port, prefix)
    _drop_broker_topology(amqp_host, int(amqp_port), tag)
    assert rc == 0, "orderd did not exit 0 within 15 s of SIGTERM (rc=%s)\n%s" % (
        rc, server.log_tail())


@pytest.fixture
def customer(orderd):
    return orderd.customer()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    server = _SESSION.get("server")
    if rep.failed and server is not None:
        rep.sections.append(("orderd-main stderr (tail)", e2e.tail(server.log_path, 40)))
