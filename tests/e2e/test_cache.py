"""The Redis read-through order cache (cache/cache.h): GetOrder is served from Redis when
it can be, every write path leaves no stale entry behind, the ownership check runs on
cached reads, and losing Redis (killed, hung, restarted) costs speed, never an error.

The first tests run on the session's orderd and Redis; the ones that kill or stop Redis
start their own redis-server (no persistence) and their own orderd on it."""

import random
import subprocess
import threading
import time

import grpc
import pytest

import orderd_e2e as e2e
from orderd_e2e import pb, expect_error

LOCAL = pb.PAYMENT_PROVIDER_LOCAL
OK = grpc.StatusCode.OK


# ---------------------------------------------------------------------------------------
# helpers


def _get(api, caller, order_id, timeout=None):
    return api.call("GetOrder", pb.GetOrderRequest(order_id=order_id), caller.token,
                    timeout=timeout)


def _confirm(api, caller, order):
    return api.call("ConfirmPayment", pb.ConfirmPaymentRequest(
        order_id=order.order_id, provider=LOCAL, payment_reference=order.payment.reference),
        caller.token)


def _cancel(api, caller, order_id, reason="changed my mind"):
    return api.call("CancelOrder", pb.CancelOrderRequest(order_id=order_id, reason=reason),
                    caller.token)


def _set_status(api, caller, order_id, status):
    return api.call("UpdateOrderStatus",
                    pb.UpdateOrderStatusRequest(order_id=order_id, status=status), caller.token)


def _psql(sql):
    r = subprocess.run(["psql", e2e.PG_DSN, "-XtAqv", "ON_ERROR_STOP=1", "-c", sql],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, "psql: %s" % r.stderr
    return r.stdout.strip()


def _wait_for(pred, timeout, what):
    """Polls pred() until it returns something true; returns it, or fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, "not within %.1fs: %s" % (timeout, what)
        time.sleep(0.05)


@pytest.fixture
def own_redis(orderd):
    """A redis-server of the test's own, killed at the end (also when it is stopped)."""
    r = e2e.RedisServer(orderd.logdir, "redis-" + e2e.unique("t")).start()
    yield r
    r.kill()


def _own_instance(orderd, redis, name, **env):
    base = {"ORDERD_REDIS_HOST": redis.host, "ORDERD_REDIS_PORT": str(redis.port),
            "ORDERD_CACHE_ENABLED": "true", "ORDERD_REDIS_TIMEOUT": "5ms"}
    base.update(env)
    return orderd.instance(name, base)


# ---------------------------------------------------------------------------------------
# hit, miss, fill (session instance)


def test_get_order_is_served_from_the_cache_and_a_miss_fills_it(orderd, customer):
    r = orderd.place(customer, [(orderd.pid("widget"), 1)])
    oid = r.order.order_id
    assert orderd.get(customer, oid) == r.order
    keys = orderd.cached_keys(oid)
    assert len(keys) == 1, "expected one cache key %s, have %s" % (
        e2e.order_key_pattern(orderd.key_prefix, oid), keys)

    # Changed in PostgreSQL behind orderd's back: a hit still answers the cached copy.
    _psql("UPDATE orders SET cancel_reason = 'changed behind orderd' WHERE id = '%s'" % oid)
    hit = orderd.get(customer, oid)
    assert hit == r.order, "GetOrder did not answer from the cache (saw the row's change)"

    # A miss reads PostgreSQL and fills the cache again.
    e2e.redis_cli(orderd.redis_host, orderd.redis_port, "DEL", *keys)
    assert orderd.cached_keys(oid) == []
    miss = orderd.get(customer, oid)
    assert miss.cancel_reason == "changed behind orderd"
    assert miss.version == r.order.version
    assert len(orderd.cached_keys(oid)) == 1, "a miss did not fill the cache"
    assert orderd.get(customer, oid) == miss

    # A write through orderd replaces the entry: the next read is the write's result.
    c = _cancel(orderd.api, customer, oid, reason="real reason")
    assert orderd.get(customer, oid) == c
    assert c.status == pb.ORDER_STATUS_CANCELLED and c.cancel_reason == "real reason"


def test_list_orders_reads_postgres_not_the_cache(orderd, customer):
    r = orderd.place(customer, [(orderd.pid("widget"), 1)])
    oid = r.order.order_id
    assert orderd.get(customer, oid) == r.order  # cached now
    _psql("UPDATE orders SET cancel_reason = 'listed from postgres' WHERE id = '%s'" % oid)
    listed = orderd.list_all(customer)
    assert [o.cancel_reason for o in listed] == ["listed from postgres"]


# ---------------------------------------------------------------------------------------
# invalidation: a read right after every write path sees that write


def test_reads_after_every_write_path_are_fresh(orderd, customer):
    api = orderd.api
    items = [(orderd.pid("widget"), 1), (orderd.pid("gadget"), 1)]
    n = 0
    for i in range(10):
        # PlaceOrder, confirm, ship, deliver, with PlaceOrder replays in between.
        req = orderd.place_request(items)
        r = api.call("PlaceOrder", req, customer.token)
        oid = r.order.order_id
        assert _get(api, customer, oid) == r.order
        assert orderd.cached_keys(oid), "GetOrder left no cache entry"
        replay = api.call("PlaceOrder", req, customer.token)
        assert replay.order.order_id == oid
        assert _get(api, customer, oid) == replay.order
        paid = _confirm(api, customer, r.order)
        assert paid.status == pb.ORDER_STATUS_PAID and paid.version > r.order.version
        assert _get(api, customer, oid) == paid, "stale read after ConfirmPayment"
        replay = api.call("PlaceOrder", req, customer.token)
        assert replay.order.status == pb.ORDER_STATUS_PAID
        assert _get(api, customer, oid) == paid, "stale read after a PlaceOrder replay"
        shipped = _set_status(api, orderd.service, oid, pb.ORDER_STATUS_SHIPPED)
        assert shipped.status == pb.ORDER_STATUS_SHIPPED and shipped.version > paid.version
        assert _get(api, customer, oid) == shipped, "stale read after UpdateOrderStatus(SHIPPED)"
        delivered = _set_status(api, orderd.service, oid, pb.ORDER_STATUS_DELIVERED)
        assert delivered.version > shipped.version
        assert _get(api, customer, oid) == delivered, \
            "stale read after UpdateOrderStatus(DELIVERED)"
        assert _get(api, orderd.service, oid) == delivered
        n += 1

        # CancelOrder of a pending order (payment voided), then a replay.
        req = orderd.place_request(items)
        r = api.call("PlaceOrder", req, customer.token)
        oid = r.order.order_id
        assert _get(api, customer, oid) == r.order
        cancelled = _cancel(api, customer, oid)
        assert cancelled.status == pb.ORDER_STATUS_CANCELLED
        assert _get(api, customer, oid) == cancelled, "stale read after CancelOrder"
        replay = api.call("PlaceOrder", req, customer.token)
        assert replay.order.status == pb.ORDER_STATUS_CANCELLED
        assert _get(api, customer, oid) == cancelled, "stale read after a replay"

        # CancelOrder of a paid order (refund: a second write after the transition).
        r = api.call("PlaceOrder", orderd.place_request(items), customer.token)
        oid = r.order.order_id
        paid = _confirm(api, customer, r.order)
        assert _get(api, customer, oid) == paid
        refunded = _cancel(api, orderd.service, oid)
        assert refunded.status == pb.ORDER_STATUS_CANCELLED
        assert refunded.payment.status == pb.PAYMENT_STATUS_REFUNDED
        assert _get(api, customer, oid) == refunded, "stale read after a refunding cancel"
    assert n == 10


def test_reads_racing_writes_never_go_back_after_an_acknowledged_write(orderd, customer):
    """Readers hammer one order while a writer moves it along; a read that starts after a
    write was acknowledged must see that write's version or a newer one."""
    api = orderd.api
    stop = threading.Event()
    samples = []  # (start, version, status) per reader call
    errors = []
    current = {"oid": None}
    lock = threading.Lock()

    def reader():
        while not stop.is_set():
            oid = current["oid"]
            t = time.monotonic()
            try:
                o = _get(api, customer, oid)
            except grpc.RpcError as e:
                errors.append((e.code(), e.details()))
                continue
            with lock:
                samples.append((oid, t, o.version))

    acks = []  # (oid, time the ack arrived, version)
    orders = [orderd.place(customer, [(orderd.pid("penny"), 1)]).order for _ in range(6)]
    current["oid"] = orders[0].order_id
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for o in orders:
            current["oid"] = o.order_id
            time.sleep(0.02)
            for write in (lambda: _confirm(api, customer, o),
                          lambda: _set_status(api, orderd.service, o.order_id,
                                              pb.ORDER_STATUS_SHIPPED),
                          lambda: _set_status(api, orderd.service, o.order_id,
                                              pb.ORDER_STATUS_DELIVERED)):
                w = write()
                acks.append((o.order_id, time.monotonic(), w.version))
                time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    late = []
    for oid, t_ack, version in acks:
        for s_oid, t_start, v in samples:
            if s_oid == oid and t_start > t_ack and v < version:
                late.append((oid, version, v, round(t_start - t_ack, 4)))
    print("%d reads, %d acknowledged writes" % (len(samples), len(acks)))
    assert len(samples) > 50, "too few reads to say anything"
    assert late == [], "reads started after a write was acknowledged saw an older version " \
                       "(order, acked version, read version, seconds after the ack): %s" % late[:10]


# ---------------------------------------------------------------------------------------
# ownership on cached reads


def test_a_cached_order_is_not_found_for_another_customer(orderd, customer):
    other = orderd.customer()
    for _ in range(5):
        r = orderd.place(customer, [(orderd.pid("widget"), 1)])
        oid = r.order.order_id
        assert orderd.get(customer, oid) == r.order
        assert orderd.cached_keys(oid), "the order is not in the cache"
        for _ in range(4):  # land on several workers
            err = expect_error(lambda: orderd.get(other, oid), grpc.StatusCode.NOT_FOUND)
            assert customer.sub not in (err.details() or "")
        expect_error(lambda: _cancel(orderd.api, other, oid), grpc.StatusCode.NOT_FOUND)
        assert orderd.get(customer, oid) == r.order
        assert orderd.get(orderd.service, oid) == r.order


def test_with_the_cache_disabled_nothing_is_cached(orderd, customer):
    with orderd.instance("orderd-nocache", {"ORDERD_CACHE_ENABLED": "false"}) as srv:
        r = srv.api.call("PlaceOrder", orderd.place_request([(orderd.pid("widget"), 1)]),
                         customer.token)
        oid = r.order.order_id
        for _ in range(3):
            assert _get(srv.api, customer, oid) == r.order
        _psql("UPDATE orders SET cancel_reason = 'seen at once' WHERE id = '%s'" % oid)
        assert _get(srv.api, customer, oid).cancel_reason == "seen at once"
        assert orderd.redis_scan(srv.key_prefix + "o:*") == []


# ---------------------------------------------------------------------------------------
# Redis killed, hung, restarted (each with a redis-server of its own)


def _load(api, customer, ids, items, stop, out, place_every=10):
    """A client thread: GetOrder round robin (and every `place_every`th call PlaceOrder)
    until `stop`; appends (start, seconds, method, code, detail) to out."""
    rnd = random.Random()
    n = 0
    while not stop.is_set():
        n += 1
        t = time.monotonic()
        if n % place_every == 0:
            method = "PlaceOrder"
            fn = lambda: api.call("PlaceOrder", pb.PlaceOrderRequest(  # noqa: E731
                request_id=e2e.unique("req"), items=[pb.LineItem(product_id=p, quantity=q)
                                                     for p, q in items],
                payment_provider=LOCAL), customer.token, timeout=10)
        else:
            method = "GetOrder"
            oid = rnd.choice(ids)
            fn = lambda: _get(api, customer, oid, timeout=10)  # noqa: E731
        try:
            fn()
            out.append((t, time.monotonic() - t, method, "OK", ""))
        except grpc.RpcError as e:
            out.append((t, time.monotonic() - t, method, e.code().name, e.details()))


def _run_load(srv, customer, ids, items, schedule, nthreads=4):
    """Runs nthreads client threads; schedule is [(seconds after start, action)], the
    last action's time ends the run. Returns (t0, results)."""
    stop = threading.Event()
    out = []
    threads = [threading.Thread(target=_load, args=(srv.api, customer, ids, items, stop, out))
               for _ in range(nthreads)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        for at, action in schedule:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the test's timeline, not a synchronisation
            action()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return t0, out


def test_redis_killed_mid_run_and_restarted_get_order_stays_100_percent(orderd, own_redis):
    cust = orderd.customer()
    items = [(orderd.pid("widget"), 1)]
    with _own_instance(orderd, own_redis, "orderd-redis-kill") as srv:
        ids = [srv.api.call("PlaceOrder", orderd.place_request(items), cust.token).order.order_id
               for _ in range(8)]
        for oid in ids:
            _get(srv.api, cust, oid)
        pattern = e2e.order_key_pattern(srv.key_prefix, ids[0])
        assert own_redis.scan(pattern), "GetOrder left no cache entry before the kill"
        events = {}

        def kill():
            own_redis.kill()
            events["killed"] = time.monotonic()

        def restart():
            own_redis.restart()
            events["restarted"] = time.monotonic()

        t0, out = _run_load(srv, cust, ids, items,
                            [(2.0, kill), (4.0, restart), (6.0, lambda: None)])
        gets = [r for r in out if r[2] == "GetOrder"]
        places = [r for r in out if r[2] == "PlaceOrder"]
        during = [r for r in gets if events["killed"] <= r[0] < events["restarted"]]
        after = [r for r in gets if r[0] >= events["restarted"]]
        failed = [r for r in out if r[3] != "OK"]
        print("GetOrder: %d calls (%d while Redis was dead, %d after the restart), "
              "PlaceOrder: %d, max latency %.3fs, failures %d" % (
                  len(gets), len(during), len(after), len(places),
                  max(r[1] for r in out), len(failed)))
        assert len(during) >= 20 and len(after) >= 20, "the load did not cover the outage"
        assert places, "no PlaceOrder ran"
        assert failed == [], "%d of %d calls failed, first: %s" % (
            len(failed), len(out), [(m, c, d) for _, _, m, c, d in failed[:5]])

        # After the restart (an empty Redis), GetOrder fills the cache again.
        def refilled():
            _get(srv.api, cust, ids[0])
            return own_redis.scan(pattern)
        _wait_for(refilled, 10, "the cache is used again after Redis restarted (%s)" % pattern)


def test_no_stale_entry_survives_an_outage(orderd, own_redis):
    """GetOrder caches v; Redis stops (SIGSTOP: its data stays); CancelOrder commits but
    cannot update Redis; Redis comes back with the old entry still in it. No read, before
    or after orderd uses Redis again, may answer the old PENDING order."""
    cust = orderd.customer()
    with _own_instance(orderd, own_redis, "orderd-redis-stale") as srv:
        api = srv.api
        probe = api.call("PlaceOrder", orderd.place_request([(orderd.pid("penny"), 1)]),
                         cust.token).order.order_id
        probe_pattern = e2e.order_key_pattern(srv.key_prefix, probe)
        for i in range(5):
            r = api.call("PlaceOrder", orderd.place_request([(orderd.pid("widget"), 1)]),
                         cust.token)
            oid = r.order.order_id
            pattern = e2e.order_key_pattern(srv.key_prefix, oid)

            def cached():
                assert _get(api, cust, oid) == r.order
                return own_redis.scan(pattern)
            _wait_for(cached, 10, "round %d: GetOrder caches the order (%s)" % (i, pattern))
            stale_keys = own_redis.scan(pattern)
            for k in own_redis.scan(probe_pattern):
                own_redis.cli("DEL", k)

            own_redis.pause()
            try:
                c = _cancel(api, cust, oid)  # committed; the server cannot update Redis
                assert c.status == pb.ORDER_STATUS_CANCELLED
                assert _get(api, cust, oid) == c
            finally:
                own_redis.resume()
            left = [k for k in stale_keys if own_redis.cli("EXISTS", k).strip() == "1"]

            # Read until orderd demonstrably uses Redis again (the probe order is cached
            # again), then some more: every read must be the cancelled order.
            reads = []

            def fresh_and_back():
                # Four at once, so that several workers (each with its own Redis
                # connection) answer.
                futures = [api.future("GetOrder", pb.GetOrderRequest(order_id=oid), cust.token)
                           for _ in range(4)]
                for f in futures:
                    got = f.result()
                    reads.append(got)
                    assert got.status == pb.ORDER_STATUS_CANCELLED, (
                        "round %d, read %d after Redis came back: %s v%d; the acknowledged "
                        "CancelOrder made it CANCELLED v%d (stale entry from before the "
                        "outage; old keys still in Redis: %s)" % (
                            i, len(reads), pb.OrderStatus.Name(got.status), got.version,
                            c.version, left))
                    assert got == c
                _get(api, cust, probe)
                return own_redis.scan(probe_pattern)
            _wait_for(fresh_and_back, 10, "round %d: orderd uses Redis again" % i)
            for _ in range(5):
                fresh_and_back()
            print("round %d: %d reads after the outage, old keys left in Redis: %s" % (
                i, len(reads), left))


def test_hung_redis_costs_no_long_stall(orderd, own_redis):
    cust = orderd.customer()
    items = [(orderd.pid("widget"), 1)]
    with _own_instance(orderd, own_redis, "orderd-redis-hung",
                       ORDERD_REDIS_TIMEOUT="5ms") as srv:
        ids = [srv.api.call("PlaceOrder", orderd.place_request(items), cust.token).order.order_id
               for _ in range(4)]
        for oid in ids:
            _get(srv.api, cust, oid)
        events = {}

        def pause():
            own_redis.pause()
            events["paused"] = time.monotonic()

        def resume():
            own_redis.resume()
            events["resumed"] = time.monotonic()

        try:
            t0, out = _run_load(srv, cust, ids, items,
                                [(0.5, pause), (3.0, resume), (4.0, lambda: None)],
                                nthreads=2)
        finally:
            if own_redis.stopped:
                own_redis.resume()
        during = [r for r in out if events["paused"] <= r[0] < events["resumed"]]
        failed = [r for r in out if r[3] != "OK"]
        slow = sorted((r for r in out if r[1] >= 1.0), key=lambda r: -r[1])
        worst_during = max(r[1] for r in during) if during else None
        print("%d calls, %d while Redis was stopped; max latency %.3fs (while stopped %s)" % (
            len(out), len(during), max(r[1] for r in out), worst_during))
        assert slow == [], (
            "calls of 1 s or more with redis.timeout 5ms (method, seconds, started at s; "
            "Redis stopped at %.2f s, resumed at %.2f s): %s" % (
                events["paused"] - t0, events["resumed"] - t0,
                [(m, round(s, 3), round(t - t0, 2)) for t, s, m, _, _ in slow[:5]]))
        assert failed == [], "%d calls failed, first: %s" % (
            len(failed), [(m, c, d) for _, _, m, c, d in failed[:5]])
        assert len(during) >= 20, "the load did not cover the hang"
