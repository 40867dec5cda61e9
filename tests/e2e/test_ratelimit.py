"""Rate limits (server/ratelimit.c): per caller and per method class, with per-method
overrides, shared through Redis by every replica, RESOURCE_EXHAUSTED with RetryInfo and
QuotaFailure, a local fallback at rate / replicas when Redis is unreachable, and health
and reflection never limited.

Every test runs its own orderd with small limits (the session's are too high to reach);
those that keep Redis up use the session's Redis under a key prefix of their own."""

import json
import math
import time

import grpc
import pytest

import orderd_e2e as e2e
from orderd_e2e import pb, detail

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
REFL = e2e.refl_v1_pb2


def _env(orderd, **kw):
    env = {"ORDERD_REDIS_HOST": orderd.redis_host, "ORDERD_REDIS_PORT": str(orderd.redis_port),
           "ORDERD_RATELIMIT_ENABLED": "true", "ORDERD_RATELIMIT_OVERRIDES": "",
           "ORDERD_RATELIMIT_REPLICAS": "1"}
    env.update({"ORDERD_RATELIMIT_" + k.upper(): v for k, v in kw.items()})
    return env


def _get(api, caller, order_id):
    return api.call("GetOrder", pb.GetOrderRequest(order_id=order_id), caller.token)


def _get_product(api, caller, product_id):
    return api.call("GetProduct", pb.GetProductRequest(product_id=product_id), caller.token)


def _place(orderd, api, caller):
    return api.call("PlaceOrder", orderd.place_request([(orderd.pid("widget"), 1)]),
                    caller.token)


def _burst(calls):
    """Runs the callables back to back; returns ([True for OK / the RpcError], seconds)."""
    out = []
    t0 = time.monotonic()
    for fn in calls:
        try:
            fn()
            out.append(True)
        except grpc.RpcError as e:
            out.append(e)
    return out, time.monotonic() - t0


def _codes(results):
    return ["OK" if r is True else r.code().name for r in results]


def _retry_delay(err):
    return detail(err, "RetryInfo").retry_delay.ToNanoseconds() / 1e9


def _assert_quota_failure(err, caller):
    qf = detail(err, "QuotaFailure")
    assert len(qf.violations) >= 1, qf
    assert caller.sub in qf.violations[0].subject, (
        "QuotaFailure subject %r does not name the caller %s" % (qf.violations[0].subject,
                                                                 caller.sub))
    return qf


def _fallback_lines(path):
    """Log lines saying the rate limiter falls back to local limits."""
    out = []
    with open(path, "r", errors="replace") as f:
        for line in f:
            try:
                msg = json.loads(line).get("msg", "")
            except ValueError:
                msg = line
            m = str(msg).lower()
            if "rate limit" in m and ("local" in m or "fall" in m):
                out.append(line.strip())
    return out


@pytest.fixture(scope="module")
def limited(orderd):
    """orderd with customers at 5/s, burst 5, and GetProduct at 1/1 for customers."""
    with orderd.instance("orderd-limited",
                         _env(orderd, customer="5/5",
                              overrides="GetProduct:customer=1/1")) as srv:
        yield srv


def test_over_the_limit_is_resource_exhausted_with_retry_info_and_quota_failure(
        orderd, limited):
    cust = orderd.customer()
    oid = _place(orderd, limited.api, cust).order.order_id
    results, elapsed = _burst([lambda: _get(limited.api, cust, oid)] * 6)
    assert _codes(results) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"], (
        "customer 5/5: %s in %.3fs" % (_codes(results), elapsed))
    err = results[5]
    delay = _retry_delay(err)
    # GCRA at 5/s: the next request fits 200 ms after the first of the burst.
    assert 0.2 - elapsed - 0.02 <= delay <= 0.2 + 0.02, (
        "retry_delay %.3fs after a burst of %.3fs (expected about 0.2 s)" % (delay, elapsed))
    _assert_quota_failure(err, cust)
    time.sleep(delay)
    assert _get(limited.api, cust, oid).order_id == oid, "retrying after retry_delay failed"


def test_budgets_are_per_caller(orderd, limited):
    a, b = orderd.customer(), orderd.customer()
    oa = _place(orderd, limited.api, a).order.order_id
    ob = _place(orderd, limited.api, b).order.order_id
    results, elapsed = _burst([lambda: _get(limited.api, a, oa)] * 6)
    assert _codes(results) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"], (_codes(results), elapsed)
    results, elapsed = _burst([lambda: _get(limited.api, b, ob)] * 5)
    assert _codes(results) == ["OK"] * 5, (
        "another customer is limited by the first one's budget: %s" % _codes(results))


def test_budgets_are_per_method_class(orderd, limited):
    cust = orderd.customer()
    oid = _place(orderd, limited.api, cust).order.order_id  # write 1 of 5
    results, elapsed = _burst([lambda: _get(limited.api, cust, oid)] * 6)
    assert _codes(results) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"], (_codes(results), elapsed)
    # Reads are spent; writes have their own budget.
    results, elapsed = _burst([
        lambda: limited.api.call("CancelOrder", pb.CancelOrderRequest(order_id=oid),
                                 cust.token),
        lambda: _place(orderd, limited.api, cust),
    ])
    assert _codes(results) == ["OK", "OK"], (
        "writes refused after the reads were spent: %s" % _codes(results))


def test_an_override_gives_a_method_its_own_tighter_budget(orderd, limited):
    cust = orderd.customer()
    oid = _place(orderd, limited.api, cust).order.order_id
    pid = orderd.pid("widget")
    results, elapsed = _burst([lambda: _get_product(limited.api, cust, pid)] * 2)
    assert _codes(results) == ["OK", "RESOURCE_EXHAUSTED"], (
        "GetProduct:customer=1/1: %s" % _codes(results))
    delay = _retry_delay(results[1])
    assert 1.0 - elapsed - 0.02 <= delay <= 1.0 + 0.02, "retry_delay %.3fs at 1/s" % delay
    _assert_quota_failure(results[1], cust)
    # GetProduct took nothing from the read class: GetOrder still has its 5.
    results, elapsed = _burst([lambda: _get(limited.api, cust, oid)] * 6)
    assert _codes(results) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"], (_codes(results), elapsed)
    # The override names customers only: a service is not held to it.
    results, _ = _burst([lambda: _get_product(limited.api, orderd.service, pid)] * 3)
    assert _codes(results) == ["OK"] * 3


def test_two_processes_against_one_redis_share_one_budget(orderd):
    env = _env(orderd, customer="5/5", replicas="2")
    env["ORDERD_CACHE_KEY_PREFIX"] = "e2e-%s:" % e2e.unique("shared")  # the same for both
    with orderd.instance("orderd-shared-1", env) as one, \
            orderd.instance("orderd-shared-2", env) as two:
        cust = orderd.customer()
        oid = _place(orderd, one.api, cust).order.order_id
        servers = [one, two] * 5
        results, elapsed = _burst([lambda s=s: _get(s.api, cust, oid) for s in servers])
        codes = _codes(results)
        ok = codes.count("OK")
        limit = 5 + math.floor(elapsed * 5)
        print("alternating: %s in %.3fs" % (codes, elapsed))
        assert 5 <= ok <= limit, (
            "two replicas, customer 5/5: %d of 10 alternating calls OK in %.3fs (expected 5, "
            "at most %d): %s" % (ok, elapsed, limit, codes))
        assert codes[:5] == ["OK"] * 5, codes
        assert "OK" in codes[0::2] and "OK" in codes[1::2]
        assert "RESOURCE_EXHAUSTED" in codes[0::2] and "RESOURCE_EXHAUSTED" in codes[1::2], (
            "one process did not refuse: the budget is not shared: %s" % codes)
        for s in (one, two):
            assert _fallback_lines(s.log_path) == [], "%s fell back to local limits" % s.name


def test_with_redis_down_limits_fall_back_to_rate_over_replicas(orderd):
    closed = e2e.free_port()  # nothing listens there
    env = _env(orderd, customer="10/10", replicas="2")
    env.update({"ORDERD_REDIS_PORT": str(closed), "ORDERD_REDIS_TIMEOUT": "5ms"})
    with orderd.instance("orderd-fallback", env) as srv:
        cust = orderd.customer()
        oid = _place(orderd, srv.api, cust).order.order_id
        results, elapsed = _burst([lambda: _get(srv.api, cust, oid)] * 9)
        codes = _codes(results)
        ok = codes.count("OK")
        limit = 5 + math.floor(elapsed * 5)
        print("Redis down, customer 10/10, replicas 2: %s in %.3fs" % (codes, elapsed))
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes[:5] == ["OK"] * 5 and 5 <= ok <= limit, (
            "local limit 10/2 = 5/s burst 5: %d of 9 OK in %.3fs (at most %d): %s" % (
                ok, elapsed, limit, codes))
        refused = [r for r in results if r is not True]
        assert refused
        for err in refused:
            assert 0 < _retry_delay(err) <= 0.2 + 0.02
            _assert_quota_failure(err, cust)
        # Calls spread over more than the reconnect back-off: all answered, still locally.
        for _ in range(5):
            time.sleep(0.3)
            assert _get(srv.api, cust, oid).order_id == oid
        lines = _fallback_lines(srv.log_path)
        assert len(lines) == 1, "expected one log line about falling back, got %d:\n%s" % (
            len(lines), "\n".join(lines))


def _reflection_list(channel, token):
    stub = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=REFL.ServerReflectionRequest.SerializeToString,
        response_deserializer=REFL.ServerReflectionResponse.FromString)
    md = [("authorization", "Bearer " + token)]
    resps = list(stub(iter([REFL.ServerReflectionRequest(list_services="*")]), metadata=md,
                      timeout=e2e.TIMEOUT))
    assert len(resps) == 1
    return [s.name for s in resps[0].list_services_response.service]


def test_health_and_reflection_are_never_limited(orderd):
    with orderd.instance("orderd-tight", _env(orderd, customer="1/1", admin="1/1",
                                               service="1/1")) as srv:
        for _ in range(20):
            assert e2e.health_check(srv.channel, "") == \
                e2e.health_pb2.HealthCheckResponse.SERVING
        for _ in range(10):
            assert "orders.v1.OrderService" in _reflection_list(srv.channel, orderd.admin.token)
        # The limits are on, for the same admin: a second GetProduct at once is refused.
        pid = orderd.pid("widget")
        results, _ = _burst([lambda: _get_product(srv.api, orderd.admin, pid)] * 2)
        assert _codes(results) == ["OK", "RESOURCE_EXHAUSTED"], _codes(results)


def test_one_dropped_redis_connection_logs_the_fallback_at_most_once(orderd):
    """One worker's Redis connection is killed (CLIENT KILL) under load: that worker limits
    locally during its reconnect back-off while the others still reach Redis. That is one
    outage at most: one "falling back" line, not one per request."""
    redis = e2e.RedisServer(orderd.logdir, "redis-" + e2e.unique("drop")).start()
    try:
        env = _env(orderd)
        env.update({"ORDERD_REDIS_PORT": str(redis.port), "ORDERD_SERVER_WORKERS": "4"})
        with orderd.instance("orderd-drop-one", env) as srv:
            cust = orderd.customer()
            oid = _place(orderd, srv.api, cust).order.order_id
            # Concurrent calls until every worker has connected (4 clients besides us).
            def clients():
                futures = [srv.api.future("GetOrder", pb.GetOrderRequest(order_id=oid),
                                          cust.token) for _ in range(16)]
                for f in futures:
                    f.result()
                return [line for line in redis.cli("CLIENT", "LIST").splitlines()
                        if "cmd=client" not in line]
            deadline = time.monotonic() + 10
            conns = clients()
            while len(conns) < 4 and time.monotonic() < deadline:
                conns = clients()
            assert len(conns) >= 2, "orderd's workers did not all connect: %s" % conns
            victim = conns[0].split()[0].split("=")[1]  # "id=<n>"
            assert redis.cli("CLIENT", "KILL", "ID", victim).strip() == "1"
            ok = 0
            end = time.monotonic() + 0.6
            while time.monotonic() < end:
                futures = [srv.api.future("GetOrder", pb.GetOrderRequest(order_id=oid),
                                          cust.token) for _ in range(4)]
                ok += sum(1 for f in futures if f.result().order_id == oid)
            lines = _fallback_lines(srv.log_path)
            with open(srv.log_path, errors="replace") as f:
                dropped = [line for line in f if "connection dropped" in line
                           or "reachable again" in line]
            print("%d calls OK after the kill; %d fallback lines, %d drop/recover lines" % (
                ok, len(lines), len(dropped)))
            assert len(lines) <= 1, (
                "one dropped connection logged %d \"falling back\" lines (and %d lines about "
                "the connection / recovering) in 0.6 s, first: %s" % (
                    len(lines), len(dropped), lines[:3]))
    finally:
        redis.kill()
