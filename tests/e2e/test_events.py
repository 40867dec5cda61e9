"""The event stream (docs/events.md) as the inventory service and an order-event consumer
see it on a real RabbitMQ: what each order change publishes, in which order, with which
AMQP properties and body; the inventory replies (stock.reserved / stock.rejected,
dedupe, dead-lettering); and delivery through broker outages, dropped connections, a
SIGKILLed orderd, two relays at once and an unroutable family.

The consumer is Debian's python3-pika (BlockingConnection) on a thread of its own: it
records every delivery (queue, routing key, properties, body) and acknowledges it at once;
it reconnects when the broker drops it, so a message may be recorded twice (redelivered),
always with the same message_id. Tests on the session's orderd read the session's queues
(conftest: ORDERD_AMQP_STOCK_QUEUE / ORDERD_AMQP_ORDER_QUEUE / the dead-letter queue).
Tests that need a topology of their own (SIGKILL, unroutable family) also get a database of
their own (created, migrated, dropped): every relay on a database publishes every row of
its outbox, so a second relay on the suite's database would publish their events to the
session's exchange instead.

The broker is driven with rabbitmqctl (-n orderd@localhost, with scripts/stack.sh's
environment): stop_app / start_app (restored in a finally) and close_all_connections.
"""

import calendar
import contextlib
import datetime
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
import uuid

import grpc
import pika
import pytest

import orderd_e2e as e2e
from orderd_e2e import pb

LOCAL = pb.PAYMENT_PROVIDER_LOCAL
REPLY_KEYS = ("stock.reserved", "stock.rejected")
STATUS_OF = {"placed": "pending", "paid": "paid", "shipped": "shipped",
             "delivered": "delivered", "cancelled": "cancelled", "expired": "expired",
             "failed": "failed"}
OCCURRED_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

# ---------------------------------------------------------------------------------------
# the broker

# What orderd publishes on the stock family. Its stock queue is bound to exactly these, not
# to "stock.*", which would also catch the inventory service's replies (stock.reserved /
# stock.rejected) on the same exchange.
STOCK_KEYS = ["stock.reserve", "stock.commit", "stock.restore"]


def _amqp_addr():
    host, _, port = os.environ.get("ORDERD_E2E_AMQP", "127.0.0.1:55672").rpartition(":")
    return host, int(port)


def _params():
    host, port = _amqp_addr()
    return pika.ConnectionParameters(
        host=host, port=port, credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=10, blocked_connection_timeout=10, socket_timeout=3,
        stack_timeout=10, connection_attempts=1)


def rmqctl(*args, timeout=90, check=True):
    """rabbitmqctl -n orderd@localhost ARGS, with the environment scripts/stack.sh uses
    (its epmd port, its Erlang cookie); never starts an epmd of its own."""
    rmq = os.path.join(e2e.REPO, ".local", "stack", "rabbitmq")
    env = dict(os.environ)
    env.update({
        "RABBITMQ_NODENAME": "orderd@localhost",
        "ERL_EPMD_PORT": "54369",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_CTL_ERL_ARGS": "-start_epmd false",
        "RABBITMQ_CTL_DIST_PORT_MIN": "45680",
        "RABBITMQ_CTL_DIST_PORT_MAX": "45690",
        "RABBITMQ_CONF_ENV_FILE": os.path.join(rmq, "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": os.path.join(rmq, "rabbitmq.conf"),
        "RABBITMQ_MNESIA_BASE": os.path.join(rmq, "mnesia"),
        "RABBITMQ_LOG_BASE": os.path.join(rmq, "log"),
        "HOME": os.path.join(rmq, "home"),
    })
    r = subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", "orderd@localhost"] +
                       list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, "rabbitmqctl %s: exit %d\n%s\n%s" % (
            " ".join(args), r.returncode, r.stdout, r.stderr)
    return r


def wait_broker(timeout=60):
    """Until a pika connection succeeds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            pika.BlockingConnection(_params()).close()
            return
        except Exception as e:  # noqa: BLE001
            last = e
            time.sleep(0.2)
    raise AssertionError("RabbitMQ did not accept connections within %ds: %r" % (timeout, last))


@contextlib.contextmanager
def broker_stopped():
    """rabbitmqctl stop_app for the block; start_app (and wait until it serves) after it,
    whatever happens."""
    rmqctl("stop_app")
    try:
        yield
    finally:
        rmqctl("start_app")
        rmqctl("await_startup", check=False)
        wait_broker()


def publish(exchange, routing_key, body, message_id=None, app_id="e2e-inventory",
            content_type="application/json"):
    """Publishes one persistent message with publisher confirms; returns when confirmed."""
    conn = pika.BlockingConnection(_params())
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        if not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
        ch.basic_publish(exchange, routing_key, body, pika.BasicProperties(
            content_type=content_type, delivery_mode=2, message_id=message_id,
            app_id=app_id, timestamp=int(time.time())), mandatory=True)
    finally:
        conn.close()


def delete_topology(exchanges=(), queues=()):
    """Best effort: deletes queues and exchanges of a test."""
    try:
        conn = pika.BlockingConnection(_params())
    except Exception:  # noqa: BLE001 - clean-up only
        return
    try:
        for q in queues:
            try:
                conn.channel().queue_delete(q)
            except Exception:  # noqa: BLE001
                pass
        for x in exchanges:
            try:
                conn.channel().exchange_delete(x)
            except Exception:  # noqa: BLE001
                pass
    finally:
        with contextlib.suppress(Exception):
            conn.close()


class Msg:
    __slots__ = ("queue", "routing_key", "exchange", "props", "body", "data", "redelivered",
                 "at")

    def __init__(self, queue, method, props, body):
        self.queue = queue
        self.routing_key = method.routing_key
        self.exchange = method.exchange
        self.redelivered = method.redelivered
        self.props = props
        self.body = body
        self.at = time.time()
        try:
            self.data = json.loads(body)
        except ValueError:
            self.data = None

    @property
    def message_id(self):
        return self.props.message_id

    @property
    def order_id(self):
        return self.data.get("order_id") if isinstance(self.data, dict) else None

    def __repr__(self):
        return "<%s %s id=%s order=%s%s>" % (self.queue, self.routing_key, self.message_id,
                                             self.order_id, " redelivered" if self.redelivered
                                             else "")


class Recorder:
    """Consumes queues on a thread of its own, recording every delivery in arrival order
    and acknowledging it right after. `topology` = [(exchange, queue, [binding keys])],
    declared (durable, as orderd declares them) before consuming, on every connection."""

    def __init__(self, topology, name="recorder"):
        self.name = name
        self._topology = list(topology)
        self._lock = threading.Lock()
        self._msgs = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._dirty = False
        self.connections = 0
        self.errors = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout=20):
        self._thread.start()
        assert self._ready.wait(timeout), "%s: could not consume: %s" % (self.name,
                                                                        self.errors[-3:])
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=15)

    def add(self, exchange, queue, keys, timeout=20):
        """Declares, binds and consumes one more queue (now and on every reconnection)."""
        with self._lock:
            self._topology.append((exchange, queue, list(keys)))
            self._ready.clear()
            self._dirty = True
        assert self._ready.wait(timeout), "%s: could not consume %s: %s" % (
            self.name, queue, self.errors[-3:])

    def _setup(self, ch, consumed):
        with self._lock:
            topo = list(self._topology)
            self._dirty = False
        for exchange, queue, keys in topo:
            if queue in consumed:
                continue
            if exchange:
                ch.exchange_declare(exchange, exchange_type="topic", durable=True)
            ch.queue_declare(queue, durable=True)
            for k in keys:
                ch.queue_bind(queue, exchange, routing_key=k)
            ch.basic_consume(queue, self._callback(queue))
            consumed.add(queue)
        self._ready.set()

    def _callback(self, queue):
        def on_message(ch, method, props, body):
            m = Msg(queue, method, props, body)
            with self._lock:
                self._msgs.append(m)
            ch.basic_ack(method.delivery_tag)
        return on_message

    def _run(self):
        while not self._stop.is_set():
            conn = None
            try:
                conn = pika.BlockingConnection(_params())
                ch = conn.channel()
                ch.basic_qos(prefetch_count=1000)
                consumed = set()
                self._setup(ch, consumed)
                self.connections += 1
                while not self._stop.is_set():
                    if self._dirty:
                        self._setup(ch, consumed)
                    conn.process_data_events(time_limit=0.05)
            except Exception as e:  # noqa: BLE001 - the broker went away: reconnect
                self.errors.append(repr(e))
                time.sleep(0.2)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()

    # -- reading
    def all(self):
        with self._lock:
            return list(self._msgs)

    def events(self, order_id, queue=None, replies=False):
        """orderd's events of one order (in arrival order), optionally of one queue. The
        inventory replies echoed into a stock.* queue are left out unless `replies`."""
        return [m for m in self.all() if m.order_id == order_id and
                (queue is None or m.queue == queue) and
                (replies or m.routing_key not in REPLY_KEYS)]

    def by_id(self, message_id):
        return [m for m in self.all() if m.message_id == message_id]

    def wait(self, pred, timeout=20, what="messages"):
        """Polls pred() (truthy = done) until the deadline; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > deadline:
                raise AssertionError("%s: %s did not arrive within %ss (recorder errors: %s)" % (
                    self.name, what, timeout, self.errors[-3:]))
            time.sleep(0.05)


def dedup(msgs):
    """First delivery of each message_id, in arrival order; asserts that the repeats of a
    message_id are the same message (same body and routing key)."""
    seen = {}
    out = []
    for m in msgs:
        first = seen.get(m.message_id)
        if first is None:
            seen[m.message_id] = m
            out.append(m)
        else:
            assert (first.body, first.routing_key) == (m.body, m.routing_key), (
                "two different messages share message_id %s:\n%r\n%r" % (
                    m.message_id, first.body, m.body))
    return out


def keys(msgs):
    return [m.routing_key for m in msgs]


# ---------------------------------------------------------------------------------------
# the database and metrics


def sql(dsn, query):
    r = subprocess.run(["psql", dsn, "-XtAq", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", query],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, "psql: %s\n%s" % (query, r.stderr)
    return [line.split("\t") for line in r.stdout.splitlines() if line]


def outbox(dsn, order_ids=None):
    """Outbox rows (of these orders, or all) in seq order: dicts id, order_id, routing_key,
    sent, attempts, last_error."""
    where = ""
    if order_ids is not None:
        ids = list(order_ids)
        if not ids:
            return []
        where = "WHERE order_id = ANY('{%s}'::uuid[])" % ",".join(ids)
    rows = sql(dsn, "SELECT id, order_id, routing_key, published_at IS NOT NULL, attempts,"
                    " coalesce(last_error, '') FROM outbox %s ORDER BY seq" % where)
    return [{"id": r[0], "order_id": r[1], "routing_key": r[2], "sent": r[3] == "t",
             "attempts": int(r[4]), "last_error": r[5]} for r in rows]


def metrics(base):
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        return r.read().decode()


def metric(text, name, labels=None):
    """The value of one sample (0 if absent)."""
    lab = ""
    if labels:
        lab = "{" + ",".join('%s="%s"' % kv for kv in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(name + lab + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, "%s: not within %ss (last: %r)" % (what, timeout, v)
        time.sleep(0.05)


def wait_connected(base, timeout=30):
    """Until the orderd behind side port `base` reports its relay and consumer connected."""
    def up():
        t = metrics(base)
        return (metric(t, "orderd_amqp_connected", {"connection": "relay"}) == 1 and
                metric(t, "orderd_amqp_connected", {"connection": "consumer"}) == 1)
    wait_until(up, timeout, "orderd's relay and consumer connected again")


# ---------------------------------------------------------------------------------------
# checking one event against the order


def _ts(occurred_at):
    d = datetime.datetime.strptime(occurred_at, "%Y-%m-%dT%H:%M:%S.%fZ")
    return calendar.timegm(d.timetuple()) + d.microsecond / 1e6


def check_event(m, order, routing_key, since):
    """Everything a consumer may rely on in one event of `order` (as GetOrder shows it
    now). `since`: the wall clock before the change that published it."""
    p, body = m.props, m.data
    ctx = "%s %r" % (routing_key, m.body)
    assert m.routing_key == routing_key, ctx
    assert m.exchange, ctx
    assert p.content_type == "application/json", ctx
    assert p.delivery_mode == 2, ctx
    assert p.type == routing_key, ctx
    assert p.app_id == "orderd", ctx
    assert isinstance(body, dict), "body is not a JSON object: %r" % m.body
    assert e2e.UUID_RE.match(body.get("event_id", "")), ctx
    assert p.message_id == body["event_id"], ctx
    hdr = (p.headers or {}).get("order_id")
    if isinstance(hdr, bytes):
        hdr = hdr.decode()
    assert hdr == order.order_id, "header order_id %r: %s" % (p.headers, ctx)
    assert body["type"] == routing_key, ctx
    assert body["schema_version"] == 1 and type(body["schema_version"]) is int, ctx
    assert OCCURRED_RE.match(body["occurred_at"]), ctx
    at = _ts(body["occurred_at"])
    assert since - 2 <= at <= time.time() + 2, "occurred_at %s not between the change and " \
        "now: %s" % (body["occurred_at"], ctx)
    assert isinstance(p.timestamp, int) and p.timestamp == int(at), (
        "timestamp %r is not occurred_at in seconds: %s" % (p.timestamp, ctx))
    assert body["order_id"] == order.order_id, ctx
    assert body["customer_id"] == order.customer_id, ctx
    family, what = routing_key.split(".")
    if family == "stock":
        assert body["lines"] == [{"product_id": i.product_id, "quantity": i.quantity}
                                 for i in order.items], ctx
    else:
        assert body["status"] == STATUS_OF[what], ctx
        assert body["currency"] == order.currency, ctx
        for f in ("subtotal_minor", "tax_minor", "total_minor"):
            assert body[f] == getattr(order, f) and type(body[f]) is int, ctx
        assert type(body["version"]) is int and 1 <= body["version"] <= order.version, ctx
        if what in ("cancelled", "expired", "failed"):
            assert body.get("reason") == order.cancel_reason, ctx
        else:
            assert "reason" not in body, ctx


def check_chain(order, stock_msgs, order_msgs, stock_keys, order_keys, since):
    assert keys(stock_msgs) == list(stock_keys), "stock queue, order %s: %s" % (
        order.order_id, stock_msgs)
    assert keys(order_msgs) == list(order_keys), "order queue, order %s: %s" % (
        order.order_id, order_msgs)
    for m in stock_msgs:
        check_event(m, order, m.routing_key, since)
    for m in order_msgs:
        check_event(m, order, m.routing_key, since)
    versions = [m.data["version"] for m in order_msgs]
    assert versions == sorted(set(versions)), "order.* versions not increasing: %s" % versions
    if order_keys and order_keys[0] == "order.placed":
        assert versions[0] == 1
    ids = [m.message_id for m in stock_msgs + order_msgs]
    assert len(set(ids)) == len(ids), "an event id repeats: %s" % ids


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def bus(orderd):
    """A recorder on the session's stock, order and dead-letter queues."""
    env = orderd.env
    x = env["ORDERD_AMQP_EXCHANGE"]
    rec = Recorder([(x, env["ORDERD_AMQP_STOCK_QUEUE"], STOCK_KEYS),
                    (x, env["ORDERD_AMQP_ORDER_QUEUE"], ["order.*"]),
                    (None, env["ORDERD_AMQP_DEAD_LETTER_QUEUE"], [])], "session-recorder")
    rec.stock = env["ORDERD_AMQP_STOCK_QUEUE"]
    rec.orders = env["ORDERD_AMQP_ORDER_QUEUE"]
    rec.dlq = env["ORDERD_AMQP_DEAD_LETTER_QUEUE"]
    rec.exchange = x
    rec.start()
    yield rec
    rec.stop()


@pytest.fixture
def iso_db(orderd):
    """A database of the test's own, migrated; dropped afterwards. Returns its DSN."""
    m = re.search(r"dbname=(\S+)", e2e.PG_DSN)
    name = "%s_iso_%s" % (m.group(1), uuid.uuid4().hex[:8])
    admin = re.sub(r"dbname=\S+", "dbname=postgres", e2e.PG_DSN)
    sql(admin, 'CREATE DATABASE "%s"' % name)
    dsn = re.sub(r"dbname=\S+", "dbname=" + name, e2e.PG_DSN)
    try:
        mig = e2e.run_cli(["migrate"], dict(orderd.env, ORDERD_POSTGRES_DSN=dsn), timeout=120)
        assert mig.returncode == 0, mig.stderr
        yield dsn
    finally:
        sql(admin, 'DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


def own_topology(tag):
    """ORDERD_AMQP_* names of a topology of one test's own."""
    return {
        "ORDERD_AMQP_EXCHANGE": "e2e-%s.events" % tag,
        "ORDERD_AMQP_STOCK_QUEUE": "e2e-%s.stock" % tag,
        "ORDERD_AMQP_ORDER_QUEUE": "e2e-%s.orders" % tag,
        "ORDERD_AMQP_REPLY_QUEUE": "e2e-%s.replies" % tag,
        "ORDERD_AMQP_DEAD_LETTER_EXCHANGE": "e2e-%s.dead-letter" % tag,
        "ORDERD_AMQP_DEAD_LETTER_QUEUE": "e2e-%s.dead-letter" % tag,
    }


def drop_own_topology(t):
    delete_topology(
        exchanges=[t["ORDERD_AMQP_EXCHANGE"], t["ORDERD_AMQP_DEAD_LETTER_EXCHANGE"]],
        queues=[t["ORDERD_AMQP_STOCK_QUEUE"], t["ORDERD_AMQP_ORDER_QUEUE"],
                t["ORDERD_AMQP_REPLY_QUEUE"], t["ORDERD_AMQP_DEAD_LETTER_QUEUE"]])


def spawn(orderd, name, env):
    """An orderd like E2E.instance's, but for a test that kills it (no exit-code check)."""
    full = dict(orderd.env)
    full["ORDERD_CACHE_KEY_PREFIX"] = "e2e-%s:" % uuid.uuid4().hex[:12]
    full["ORDERD_HTTP_LISTEN"] = "127.0.0.1:0"
    full.update(env)
    srv = e2e.Orderd(full, orderd.logdir, "%s-%s" % (name, uuid.uuid4().hex[:6])).start()
    try:
        srv.wait_health(e2e.health_pb2.HealthCheckResponse.SERVING, timeout=20)
    except BaseException:
        srv.kill()
        srv.stop()
        raise
    srv.api = e2e.Api(srv.channel)
    return srv


def _products(orderd, api, n=3):
    """Products in a test's own database (UpsertProduct through `api`)."""
    out = []
    for i in range(n):
        pid = "e2e-ev-%s-%d" % (uuid.uuid4().hex[:8], i)
        api.call("UpsertProduct", pb.UpsertProductRequest(product=pb.Product(
            product_id=pid, name="Event item %d" % i, unit_price_minor=100 * (i + 1),
            currency="EUR", active=True)), orderd.admin.token)
        out.append(pid)
    return out


def _place(api, caller, items):
    return api.call("PlaceOrder", pb.PlaceOrderRequest(
        request_id=e2e.unique("req"), items=[pb.LineItem(product_id=p, quantity=q)
                                             for p, q in items],
        payment_provider=LOCAL), caller.token)


def _cancel(api, caller, order_id, reason="changed my mind"):
    return api.call("CancelOrder", pb.CancelOrderRequest(order_id=order_id, reason=reason),
                    caller.token)


def _get(api, caller, order_id):
    return api.call("GetOrder", pb.GetOrderRequest(order_id=order_id), caller.token)


def _confirm(orderd, caller, placed):
    return orderd.call("ConfirmPayment", pb.ConfirmPaymentRequest(
        order_id=placed.order.order_id, provider=LOCAL,
        payment_reference=placed.payment.reference), caller)


def _status(orderd, order_id, status):
    return orderd.call("UpdateOrderStatus", pb.UpdateOrderStatusRequest(
        order_id=order_id, status=status), orderd.service)


def _wait_events(bus, order_id, n_stock, n_order, timeout=20, quiet=0.5):
    """Waits for n_stock events on the stock queue and n_order on the order queue, then
    `quiet` seconds more (anything extra shows up); returns (stock msgs, order msgs)."""
    bus.wait(lambda: len(bus.events(order_id, bus.stock)) >= n_stock and
             len(bus.events(order_id, bus.orders)) >= n_order, timeout,
             "%d stock + %d order events of %s (have %s)" % (
                 n_stock, n_order, order_id, bus.events(order_id)))
    time.sleep(quiet)
    return bus.events(order_id, bus.stock), bus.events(order_id, bus.orders)


# ---------------------------------------------------------------------------------------
# what each change publishes


def test_place_publishes_stock_reserve_then_order_placed(orderd, bus, customer):
    since = time.time()
    r = orderd.place(customer, [(orderd.pid("widget"), 2), (orderd.pid("gadget"), 1)])
    o = orderd.get(customer, r.order.order_id)
    stock, orders = _wait_events(bus, o.order_id, 1, 1)
    check_chain(o, stock, orders, ["stock.reserve"], ["order.placed"], since)
    assert orders[0].data["status"] == "pending"


def test_confirm_payment_publishes_stock_commit_then_order_paid(orderd, bus, customer):
    since = time.time()
    r = orderd.place(customer, [(orderd.pid("gadget"), 3)])
    paid = _confirm(orderd, customer, r)
    assert paid.status == pb.ORDER_STATUS_PAID
    o = orderd.get(customer, r.order.order_id)
    stock, orders = _wait_events(bus, o.order_id, 2, 2)
    check_chain(o, stock, orders, ["stock.reserve", "stock.commit"],
                ["order.placed", "order.paid"], since)
    assert orders[1].data["version"] <= paid.version


def test_cancel_pending_publishes_stock_restore_then_order_cancelled(orderd, bus, customer):
    since = time.time()
    r = orderd.place(customer, [(orderd.pid("widget"), 1), (orderd.pid("penny"), 7)])
    c = _cancel(orderd.api, customer, r.order.order_id, "found it cheaper")
    assert c.status == pb.ORDER_STATUS_CANCELLED
    o = orderd.get(customer, r.order.order_id)
    assert o.cancel_reason == "found it cheaper"
    stock, orders = _wait_events(bus, o.order_id, 2, 2)
    check_chain(o, stock, orders, ["stock.reserve", "stock.restore"],
                ["order.placed", "order.cancelled"], since)
    assert orders[1].data["reason"] == "found it cheaper"


def test_cancel_paid_publishes_stock_restore_after_commit(orderd, bus, customer):
    since = time.time()
    r = orderd.place(customer, [(orderd.pid("widget"), 4)])
    _confirm(orderd, customer, r)
    c = _cancel(orderd.api, customer, r.order.order_id, "paid, then changed my mind")
    assert c.status == pb.ORDER_STATUS_CANCELLED
    o = orderd.get(customer, r.order.order_id)
    stock, orders = _wait_events(bus, o.order_id, 3, 3)
    check_chain(o, stock, orders, ["stock.reserve", "stock.commit", "stock.restore"],
                ["order.placed", "order.paid", "order.cancelled"], since)


def test_shipped_and_delivered_publish_order_events_only(orderd, bus, customer):
    since = time.time()
    r = orderd.place(customer, [(orderd.pid("yen"), 2)])
    _confirm(orderd, customer, r)
    assert _status(orderd, r.order.order_id, pb.ORDER_STATUS_SHIPPED).status == \
        pb.ORDER_STATUS_SHIPPED
    assert _status(orderd, r.order.order_id, pb.ORDER_STATUS_DELIVERED).status == \
        pb.ORDER_STATUS_DELIVERED
    o = orderd.get(customer, r.order.order_id)
    stock, orders = _wait_events(bus, o.order_id, 2, 4)
    check_chain(o, stock, orders, ["stock.reserve", "stock.commit"],
                ["order.placed", "order.paid", "order.shipped", "order.delivered"], since)
    assert orders[0].data["currency"] == "JPY"


def test_pending_order_expires_with_payment_voided_and_events(orderd, bus, customer, iso_db):
    # On a database of its own, so that its sweeper does not expire every other test's
    # pending orders; it publishes to the session's exchange, and leaves the session's
    # replies to the session's orderd.
    with orderd.instance("events-expiry", {"ORDERD_ORDERS_PENDING_TTL": "2s",
                                           "ORDERD_ORDERS_SWEEP_INTERVAL": "200ms",
                                           "ORDERD_POSTGRES_DSN": iso_db,
                                           "ORDERD_AMQP_CONSUME_REPLIES": "false"}) as srv:
        products = _products(orderd, srv.api, 2)
        since = time.time()
        r = _place(srv.api, customer, [(products[0], 2), (products[1], 1)])
        oid = r.order.order_id

        def expired():
            o = _get(srv.api, customer, oid)
            return o if o.status == pb.ORDER_STATUS_EXPIRED else None
        o = wait_until(expired, 20, "order %s EXPIRED" % oid)
        assert time.time() - since >= 1.9, "expired before its TTL"
        wait_until(lambda: _get(srv.api, customer, oid).payment.status ==
                   pb.PAYMENT_STATUS_VOIDED, 10, "payment VOIDED")
        o = _get(srv.api, customer, oid)
        assert o.cancel_reason, "an expired order says why"
        stock, orders = _wait_events(bus, oid, 2, 2)
        check_chain(o, stock, orders, ["stock.reserve", "stock.restore"],
                    ["order.placed", "order.expired"], since)


# ---------------------------------------------------------------------------------------
# inventory replies


def _reply(bus, kind, order_id, reason=None, event_id=None):
    eid = event_id or str(uuid.uuid4())
    body = {"event_id": eid, "type": kind, "order_id": order_id}
    if reason is not None:
        body["reason"] = reason
    publish(bus.exchange, kind, body, message_id=eid)
    return eid


def test_stock_rejected_fails_the_order_once(orderd, bus, customer):
    since = time.time()
    r = orderd.place(customer, [(orderd.pid("gadget"), 2)])
    oid = r.order.order_id
    _wait_events(bus, oid, 1, 1, quiet=0)
    before = metrics(orderd.http_base)
    eid = _reply(bus, "stock.rejected", oid, "gadget out of stock")

    def failed():
        o = orderd.get(customer, oid)
        return o if o.status == pb.ORDER_STATUS_FAILED else None
    wait_until(failed, 20, "order FAILED after stock.rejected")
    wait_until(lambda: orderd.get(customer, oid).payment.status == pb.PAYMENT_STATUS_VOIDED,
               10, "payment VOIDED")
    o = orderd.get(customer, oid)
    assert "gadget out of stock" in o.cancel_reason
    stock, orders = _wait_events(bus, oid, 2, 2)
    check_chain(o, stock, orders, ["stock.reserve", "stock.restore"],
                ["order.placed", "order.failed"], since)

    # The same reply again (same event_id / message_id): acknowledged as a duplicate.
    base_dup = metric(before, "orderd_inventory_replies_total", {"result": "duplicate"})
    _reply(bus, "stock.rejected", oid, "gadget out of stock", event_id=eid)
    wait_until(lambda: metric(metrics(orderd.http_base), "orderd_inventory_replies_total",
                              {"result": "duplicate"}) >= base_dup + 1, 15,
               "the repeated reply counted as a duplicate")
    stock2, orders2 = _wait_events(bus, oid, 2, 2, quiet=1.0)
    assert keys(stock2) == keys(stock) and keys(orders2) == keys(orders), (
        "the repeated reply published more: %s %s" % (stock2, orders2))
    again = orderd.get(customer, oid)
    assert again.version == o.version and again.status == pb.ORDER_STATUS_FAILED


def test_stock_rejected_after_payment_cancels_and_refunds(orderd, bus, customer):
    """Paid before the inventory answered, then no stock: the goods cannot ship, so the
    order is cancelled with the reason and the money goes back."""
    r = orderd.place(customer, [(orderd.pid("widget"), 3)])
    oid = r.order.order_id
    paid = _confirm(orderd, customer, r)
    _wait_events(bus, oid, 2, 2, quiet=0)
    _reply(bus, "stock.rejected", oid, "too late")

    def cancelled():
        o = orderd.get(customer, oid)
        return o if (o.status, o.payment.status) == (pb.ORDER_STATUS_CANCELLED,
                                                     pb.PAYMENT_STATUS_REFUNDED) else None
    o = wait_until(cancelled, 20, "order CANCELLED and refunded after stock.rejected")
    assert o.cancel_reason == "stock rejected: too late"
    assert o.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert o.payment.refund_id and o.payment.HasField("refunded_at")
    assert o.version > paid.version
    stock, orders = _wait_events(bus, oid, 3, 3, quiet=0.7)
    assert keys(stock) == ["stock.reserve", "stock.commit", "stock.restore"], stock
    assert keys(orders) == ["order.placed", "order.paid", "order.cancelled"], orders


def test_stock_rejected_after_reserved_changes_nothing(orderd, bus, customer):
    """A rejection contradicting a reservation already confirmed leaves the order alone."""
    r = orderd.place(customer, [(orderd.pid("widget"), 1)])
    oid = r.order.order_id
    _wait_events(bus, oid, 1, 1, quiet=0)
    _reply(bus, "stock.reserved", oid)
    wait_until(lambda: orderd.get(customer, oid).HasField("stock_reserved_at"), 20,
               "stock_reserved_at set")
    paid = _confirm(orderd, customer, r)
    before = metrics(orderd.http_base)
    _reply(bus, "stock.rejected", oid, "miscounted")
    lab = {"result": "applied"}
    wait_until(lambda: metric(metrics(orderd.http_base), "orderd_inventory_replies_total",
                              lab) > metric(before, "orderd_inventory_replies_total", lab),
               15, "the reply consumed")
    stock, orders = _wait_events(bus, oid, 2, 2, quiet=0.7)
    assert keys(stock) == ["stock.reserve", "stock.commit"], stock
    assert keys(orders) == ["order.placed", "order.paid"], orders
    o = orderd.get(customer, oid)
    assert (o.status, o.version, o.payment.status) == (pb.ORDER_STATUS_PAID, paid.version,
                                                       pb.PAYMENT_STATUS_SUCCEEDED)


def test_stock_reserved_sets_stock_reserved_at(orderd, bus, customer):
    r = orderd.place(customer, [(orderd.pid("widget"), 1)])
    oid = r.order.order_id
    assert not r.order.HasField("stock_reserved_at")
    assert not orderd.get(customer, oid).HasField("stock_reserved_at")  # cached now
    _wait_events(bus, oid, 1, 1, quiet=0)
    t0 = time.time()
    _reply(bus, "stock.reserved", oid)
    o = wait_until(lambda: (lambda o: o if o.HasField("stock_reserved_at") else None)(
        orderd.get(customer, oid)), 15, "GetOrder shows stock_reserved_at")
    at = o.stock_reserved_at.ToNanoseconds() / 1e9
    assert t0 - 2 <= at <= time.time() + 2
    assert o.status == pb.ORDER_STATUS_PENDING
    # A change that keeps the status publishes nothing.
    stock, orders = _wait_events(bus, oid, 1, 1, quiet=0.7)
    assert keys(stock) == ["stock.reserve"] and keys(orders) == ["order.placed"]


def test_malformed_replies_are_dead_lettered_and_the_consumer_goes_on(orderd, bus, customer):
    r = orderd.place(customer, [(orderd.pid("penny"), 3)])
    oid = r.order.order_id
    before = metrics(orderd.http_base)
    bad = []
    # not JSON
    mid = str(uuid.uuid4())
    publish(bus.exchange, "stock.rejected", b"stock.rejected for " + oid.encode() + b" {",
            message_id=mid)
    bad.append(mid)
    # no order_id
    mid = str(uuid.uuid4())
    publish(bus.exchange, "stock.rejected", {"event_id": mid, "type": "stock.rejected",
                                             "reason": "no order named"}, message_id=mid)
    bad.append(mid)
    # unknown type (on a bound reply key)
    mid = str(uuid.uuid4())
    publish(bus.exchange, "stock.reserved", {"event_id": mid, "type": "stock.teleported",
                                             "order_id": oid}, message_id=mid)
    bad.append(mid)
    # well-formed, for an unknown order / an order_id that is not a UUID: acknowledged and
    # ignored, not dead-lettered
    ignored = [_reply(bus, "stock.reserved", str(uuid.uuid4())),
               _reply(bus, "stock.rejected", "not-a-uuid", "whatever")]
    # then a valid reply: still applied
    _reply(bus, "stock.reserved", oid)
    o = wait_until(lambda: (lambda o: o if o.HasField("stock_reserved_at") else None)(
        orderd.get(customer, oid)), 15, "the valid reply after the malformed ones applied")
    assert o.status == pb.ORDER_STATUS_PENDING

    dead = bus.wait(lambda: (lambda d: d if len(d) >= 3 else None)(
        [m for m in bus.all() if m.queue == bus.dlq and m.message_id in bad]), 15,
        "the 3 malformed replies in the dead-letter queue")
    assert sorted(m.message_id for m in dead) == sorted(bad), dead
    for m in dead:
        assert "x-death" in (m.props.headers or {}), m.props.headers
    assert dead[0].body.endswith(b" {")
    time.sleep(0.5)
    assert not [m for m in bus.all() if m.queue == bus.dlq and m.message_id in ignored]
    after = metrics(orderd.http_base)
    lab = {"result": "dead_lettered"}
    assert metric(after, "orderd_inventory_replies_total", lab) >= \
        metric(before, "orderd_inventory_replies_total", lab) + 3


def test_the_stock_queue_does_not_echo_the_inventory_replies(orderd, bus, customer):
    """The inventory service consumes the stock queue (bound to the three stock keys) and publishes its
    replies to the same exchange under stock.reserved / stock.rejected: it should not get
    its own replies back on its queue."""
    r = orderd.place(customer, [(orderd.pid("widget"), 1)])
    oid = r.order.order_id
    eid = _reply(bus, "stock.reserved", oid)
    wait_until(lambda: orderd.get(customer, oid).HasField("stock_reserved_at"), 15,
               "reply applied")
    time.sleep(0.5)
    echoed = [m for m in bus.by_id(eid) if m.queue == bus.stock]
    assert not echoed, ("the inventory's own stock.reserved reply was routed into the stock "
                        "queue (%s, bound to the stock keys): %s" % (bus.stock, echoed))


# ---------------------------------------------------------------------------------------
# delivery under failure


def _check_delivered(rec, dsn, order_ids, stock_q, order_q, expect=None, timeout=45):
    """Waits until every outbox row of the orders is marked sent and was received; then
    checks: duplicates only with the same message_id, distinct ids == outbox rows, per
    order and family the outbox order kept in the queues. `expect`: {order_id: (stock
    keys, order keys)}. Returns the number of duplicate deliveries."""
    order_ids = list(order_ids)

    def done():
        rows = outbox(dsn, order_ids)
        got = {m.message_id for m in rec.all()}
        return rows if rows and all(r["sent"] and r["id"] in got for r in rows) else None
    try:
        rows = wait_until(done, timeout, "every outbox row sent and received")
    except AssertionError:
        rows = outbox(dsn, order_ids)
        got = {m.message_id for m in rec.all()}
        missing = [r for r in rows if r["id"] not in got]
        raise AssertionError("%d of %d outbox rows not received (e.g. %s); unsent: %d" % (
            len(missing), len(rows), missing[:3], sum(not r["sent"] for r in rows)))
    time.sleep(0.3)
    wanted = set(order_ids)
    msgs = [m for m in rec.all() if m.order_id in wanted and m.routing_key not in REPLY_KEYS]
    uniq = dedup(msgs)
    assert sorted(m.message_id for m in uniq) == sorted(r["id"] for r in rows), \
        "received event ids differ from the outbox rows"
    by_row = {r["id"]: r for r in rows}
    for m in uniq:
        r = by_row[m.message_id]
        assert (m.routing_key, m.order_id) == (r["routing_key"], r["order_id"])
        assert m.queue == (stock_q if m.routing_key.startswith("stock.") else order_q)
    for oid in order_ids:
        want_s = [r["id"] for r in rows if r["order_id"] == oid and
                  r["routing_key"].startswith("stock.")]
        want_o = [r["id"] for r in rows if r["order_id"] == oid and
                  r["routing_key"].startswith("order.")]
        got_s = [m.message_id for m in uniq if m.order_id == oid and m.queue == stock_q]
        got_o = [m.message_id for m in uniq if m.order_id == oid and m.queue == order_q]
        assert got_s == want_s, "order %s: stock events out of order: %s" % (
            oid, [m for m in msgs if m.order_id == oid and m.queue == stock_q])
        assert got_o == want_o, "order %s: order events out of order: %s" % (
            oid, [m for m in msgs if m.order_id == oid and m.queue == order_q])
        if expect and oid in expect:
            s_keys, o_keys = expect[oid]
            assert [by_row[i]["routing_key"] for i in want_s] == list(s_keys), oid
            assert [by_row[i]["routing_key"] for i in want_o] == list(o_keys), oid
    return len(msgs) - len(uniq)


def test_broker_outage_loses_nothing(orderd, bus, customer):
    wait_connected(orderd.http_base)
    n = 30
    placed, cancelled = [], set()
    with broker_stopped():
        wait_until(lambda: metric(metrics(orderd.http_base), "orderd_amqp_connected",
                                  {"connection": "relay"}) == 0, 15, "the relay noticed")
        t0 = time.monotonic()
        for i in range(n):
            r = orderd.place(customer, [(orderd.pid("widget"), 1 + i % 3)])
            placed.append(r.order.order_id)
            if i % 3 == 0:
                _cancel(orderd.api, customer, r.order.order_id, "outage %d" % i)
                cancelled.add(r.order.order_id)
        took = time.monotonic() - t0
        rows = outbox(e2e.PG_DSN, placed)
        assert len(rows) == 2 * n + 2 * len(cancelled)
        assert not any(r["sent"] for r in rows), "sent while the broker was down?"
    print("placed %d orders (+%d cancels) in %.2fs with the broker down" % (
        n, len(cancelled), took))
    expect = {oid: ((["stock.reserve", "stock.restore"], ["order.placed", "order.cancelled"])
                    if oid in cancelled else (["stock.reserve"], ["order.placed"]))
              for oid in placed}
    dups = _check_delivered(bus, e2e.PG_DSN, placed, bus.stock, bus.orders, expect)
    print("broker outage: %d duplicate deliveries" % dups)
    wait_connected(orderd.http_base)


def test_connections_closed_mid_publish_lose_nothing(orderd, bus, customer):
    wait_connected(orderd.http_base)
    reconnects0 = metric(metrics(orderd.http_base), "orderd_amqp_reconnects_total",
                         {"connection": "relay"})
    placed, cancelled, errors = [], set(), []
    stop = threading.Event()

    def place_loop():
        i = 0
        while not stop.is_set() and i < 300:
            try:
                r = orderd.place(customer, [(orderd.pid("gadget"), 1)])
                placed.append(r.order.order_id)
                if i % 2 == 0:
                    _cancel(orderd.api, customer, r.order.order_id, "closing %d" % i)
                    cancelled.add(r.order.order_id)
            except grpc.RpcError as e:
                errors.append(e)
            i += 1
            time.sleep(0.03)
    threads = [threading.Thread(target=place_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            time.sleep(0.3)
            rmqctl("close_all_connections", "test")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, "RPCs failed while the broker dropped connections: %s" % errors[:3]
    assert len(placed) >= 10
    expect = {oid: ((["stock.reserve", "stock.restore"], ["order.placed", "order.cancelled"])
                    if oid in cancelled else (["stock.reserve"], ["order.placed"]))
              for oid in placed}
    dups = _check_delivered(bus, e2e.PG_DSN, placed, bus.stock, bus.orders, expect)
    wait_connected(orderd.http_base)
    reconnects = metric(metrics(orderd.http_base), "orderd_amqp_reconnects_total",
                        {"connection": "relay"}) - reconnects0
    retried = sum(r["attempts"] > 1 for r in outbox(e2e.PG_DSN, placed))
    print("closed connections: %d orders, %d duplicate deliveries, relay reconnected %d, "
          "%d rows published more than once" % (len(placed), dups, reconnects, retried))
    assert reconnects >= 2, "the relay's connection was not closed (reconnects %d)" % reconnects


def test_two_relays_publish_each_event_once_in_order(orderd, bus):
    with orderd.instance("events-relay-a") as a, orderd.instance("events-relay-b") as b:
        placed = {}  # order_id -> (srv, caller)
        lock = threading.Lock()

        def work(srv, k):
            c = orderd.customer()
            for i in range(k):
                r = _place(srv.api, c, [(orderd.pid("penny"), 1 + i)])
                with lock:
                    placed[r.order.order_id] = (srv, c)
        res = e2e.call_all([lambda s=s: work(s, 10) for s in (a, b, a, b)])
        assert all(e is None for _, e in res), res
        ids = sorted(placed)
        cancel = ids[::2]
        res = e2e.call_all([lambda oid=oid: _cancel(placed[oid][0].api, placed[oid][1], oid)
                            for oid in cancel])
        assert all(e is None for _, e in res), res
        expect = {oid: ((["stock.reserve", "stock.restore"],
                         ["order.placed", "order.cancelled"]) if oid in cancel
                        else (["stock.reserve"], ["order.placed"])) for oid in ids}
        dups = _check_delivered(bus, e2e.PG_DSN, ids, bus.stock, bus.orders, expect)
        print("two relays: %d orders, %d duplicates" % (len(ids), dups))


def test_sigkilled_orderd_loses_no_acknowledged_event(orderd, iso_db):
    tag = uuid.uuid4().hex[:12]
    topo = own_topology(tag)
    x = topo["ORDERD_AMQP_EXCHANGE"]
    sq, oq = topo["ORDERD_AMQP_STOCK_QUEUE"], topo["ORDERD_AMQP_ORDER_QUEUE"]
    rec = Recorder([(x, sq, STOCK_KEYS), (x, oq, ["order.*"])], "sigkill-recorder").start()
    env = dict(topo, ORDERD_POSTGRES_DSN=iso_db, ORDERD_AMQP_TIMEOUT="1s",
               ORDERD_POSTGRES_STATEMENT_TIMEOUT="1s", ORDERD_AMQP_RELAY_CLAIM="1s")
    srv = None
    try:
        srv = spawn(orderd, "events-sigkill", env)
        products = _products(orderd, srv.api)
        acked, cancelled, failures = [], [], []
        stop = threading.Event()

        def load(k):
            c = orderd.customer()
            i = 0
            while not stop.is_set():
                try:
                    r = _place(srv.api, c, [(products[i % 3], 1), (products[(i + 1) % 3], 2)])
                    acked.append(r.order.order_id)
                    if i % 2 == k % 2:
                        _cancel(srv.api, c, r.order.order_id)
                        cancelled.append(r.order.order_id)
                except grpc.RpcError as e:
                    failures.append(e.code())
                    if stop.is_set() or srv.proc.poll() is not None:
                        return
                i += 1
        threads = [threading.Thread(target=load, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        srv.proc.kill()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        srv.proc.wait()
        srv.stop()
        rows = outbox(iso_db)
        unsent = sum(not r["sent"] for r in rows)
        print("sigkill: %d orders acknowledged, %d cancelled, %d outbox rows, %d unsent at "
              "kill, %d calls cut off" % (len(acked), len(cancelled), len(rows), unsent,
                                          len(failures)))
        assert len(acked) >= 10
        # Every acknowledged order is in the database, with its events in the outbox.
        in_db = {r[0] for r in sql(iso_db, "SELECT id FROM orders")}
        assert set(acked) <= in_db
        all_orders = sorted(in_db)
        with orderd.instance("events-sigkill-again", env):
            expect = {oid: ((["stock.reserve", "stock.restore"],
                             ["order.placed", "order.cancelled"]) if oid in cancelled
                            else None) for oid in acked}
            expect = {k: v for k, v in expect.items() if v}
            dups = _check_delivered(rec, iso_db, all_orders, sq, oq, expect, timeout=60)
            for oid in acked:
                got = keys(dedup(rec.events(oid)))
                assert "stock.reserve" in got and "order.placed" in got, (oid, got)
            # Nothing received that is not in the outbox.
            assert {m.message_id for m in rec.all()} == {r["id"] for r in outbox(iso_db)}
            print("sigkill: %d duplicate deliveries after the restart" % dups)
    finally:
        if srv is not None and srv.proc is not None and srv.proc.poll() is None:
            srv.kill()
            srv.stop()
        rec.stop()
        drop_own_topology(topo)


def test_unroutable_family_is_retried_and_holds_up_only_itself(orderd, iso_db):
    tag = uuid.uuid4().hex[:12]
    topo = own_topology(tag)
    x = topo["ORDERD_AMQP_EXCHANGE"]
    sq, oq = topo["ORDERD_AMQP_STOCK_QUEUE"], topo["ORDERD_AMQP_ORDER_QUEUE"]
    rec = Recorder([(x, oq, ["order.*"])], "unroutable-recorder").start()
    port = e2e.free_port()
    env = dict(topo, ORDERD_POSTGRES_DSN=iso_db, ORDERD_AMQP_DECLARE_QUEUES="false",
               ORDERD_HTTP_LISTEN="127.0.0.1:%d" % port)
    base = "http://127.0.0.1:%d" % port
    try:
        with orderd.instance("events-unroutable", env) as srv:
            c = orderd.customer()
            products = _products(orderd, srv.api)
            ids, cancelled = [], []
            for i in range(3):
                r = _place(srv.api, c, [(products[i], i + 1)])
                ids.append(r.order.order_id)
                if i < 2:
                    _cancel(srv.api, c, r.order.order_id, "unroutable %d" % i)
                    cancelled.append(r.order.order_id)
            # order.* flows while stock.* has nowhere to go.
            for oid in ids:
                want = ["order.placed", "order.cancelled"] if oid in cancelled \
                    else ["order.placed"]
                rec.wait(lambda oid=oid, want=want: keys(dedup(rec.events(oid))) == want, 20,
                         "order events of %s" % oid)

            def retried():
                rows = [r for r in outbox(iso_db) if r["routing_key"].startswith("stock.")]
                heads = [r for r in rows if r["routing_key"] == "stock.reserve"]
                return rows if all(r["attempts"] >= 2 for r in heads) else None
            rows = wait_until(retried, 20, "stock.reserve retried at least twice")
            assert not any(r["sent"] for r in rows), rows
            for r in rows:
                if r["routing_key"] == "stock.reserve":
                    assert "unroutable" in r["last_error"] or "NO_ROUTE" in r["last_error"], r
                else:  # waits behind its order's stock.reserve: never tried
                    assert r["attempts"] == 0, r
            assert all(r["sent"] for r in outbox(iso_db) if r["routing_key"].startswith(
                "order.")), "order.* rows should be sent"
            assert metric(metrics(base), "orderd_outbox_unroutable_total") > 0
            assert not [m for m in rec.all() if m.routing_key.startswith("stock.")]

            # Bind a stock.* queue: the stock events arrive, in order.
            rec.add(x, sq, STOCK_KEYS)
            expect = {oid: ((["stock.reserve", "stock.restore"],
                             ["order.placed", "order.cancelled"]) if oid in cancelled
                            else (["stock.reserve"], ["order.placed"])) for oid in ids}
            _check_delivered(rec, iso_db, ids, sq, oq, expect, timeout=30)
    finally:
        rec.stop()
        drop_own_topology(topo)


def test_stock_rejected_with_long_multibyte_reason_fails_the_order(orderd, bus, customer):
    """A valid 471-byte UTF-8 reason (the limit is 500) must not be cut mid-character on
    its way into cancel_reason: PostgreSQL would refuse it and the reply be dropped."""
    r = orderd.place(customer, [(orderd.pid("gadget"), 1)])
    oid = r.order.order_id
    _wait_events(bus, oid, 1, 1, quiet=0)
    reason = "a" + "\u00e9" * 235
    assert len(reason.encode()) == 471
    _reply(bus, "stock.rejected", oid, reason)

    def failed():
        o = orderd.get(customer, oid)
        return o if o.status == pb.ORDER_STATUS_FAILED else None
    o = wait_until(failed, 15, "order FAILED after a stock.rejected with a 471-byte reason")
    assert o.cancel_reason.startswith("stock rejected: a\u00e9")
