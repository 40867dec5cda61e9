"""The README's run command as a user meets it: `scripts/run.sh --fake-providers` in a
session of its own (a terminal), real clients against it (grpcio, the fakes' "customer
pays" endpoints, scripts/send-webhook), then Ctrl-C (SIGINT to its process group), after
which nothing it started may still be running.

The stack is already up (the suite needs it), so run.sh must leave it running; the gRPC
and HTTP ports are free ones handed over through ORDERD_SERVER_LISTEN / ORDERD_HTTP_LISTEN,
so a developer's own `scripts/run.sh` on 50051 is not in the way.
"""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

import grpc
import pytest

import orderd_e2e as e

LIB = os.path.join(e.REPO, "scripts", "lib.sh")


def lib_setting(name):
    with open(LIB, encoding="utf-8") as f:
        for line in f:
            if line.startswith(name + "="):
                return line.split("=", 1)[1].strip()
    raise KeyError(name)


def listening(port):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def fake(port, path, body):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def processes_of_checkout():
    """pid -> command line of every process whose working directory is the checkout and
    that runs orderd or a provider fake (what run.sh starts besides the stack)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % pid)
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if cwd == os.path.realpath(e.REPO) and ("build/orderd serve" in cmd or "tests/fakes/fake_" in cmd):
            found[int(pid)] = cmd
    return found


def test_run_command_serves_real_payments_and_leaves_nothing_after_ctrl_c(tmp_path):
    stripe_port = int(lib_setting("FAKE_STRIPE_PORT"))
    paypal_port = int(lib_setting("FAKE_PAYPAL_PORT"))
    for port in (stripe_port, paypal_port):
        if listening(port):
            pytest.fail("127.0.0.1:%d is taken (is a `scripts/run.sh --fake-providers` running?); "
                        "this test starts its own" % port)
    before = processes_of_checkout()
    grpc_port, http_port = e.free_port(), e.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERD_", "ASAN_", "LSAN_", "UBSAN_"))}
    env.update(ORDERD_SERVER_LISTEN="127.0.0.1:%d" % grpc_port, ORDERD_HTTP_LISTEN="127.0.0.1:%d" % http_port)
    log_path = tmp_path / "run.log"
    log = open(log_path, "wb")
    run = subprocess.Popen(["bash", "scripts/run.sh", "--fake-providers"], cwd=e.REPO, env=env,
                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        channel = grpc.insecure_channel("127.0.0.1:%d" % grpc_port)
        deadline = time.monotonic() + 300  # run.sh may have to build first
        while True:
            assert run.poll() is None, "run.sh exited early:\n" + e.tail(str(log_path))
            try:
                if e.health_check(channel, timeout=1) == e.health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "orderd never served:\n" + e.tail(str(log_path))
            time.sleep(0.5)
        api = e.Api(channel)
        token = subprocess.run(["build/orderd", "token", "--config", "config.yaml", "--subject",
                                "walker-" + uuid.uuid4().hex[:8], "--role", "customer"],
                               cwd=e.REPO, capture_output=True, text=True, check=True).stdout.strip()

        def place(provider):
            req = e.pb.PlaceOrderRequest(request_id="run-" + uuid.uuid4().hex,
                                         items=[e.pb.LineItem(product_id="sku-espresso", quantity=2)],
                                         payment_provider=provider)
            return api.call("PlaceOrder", req, token)

        # Stripe: the customer pays, Stripe tells orderd by a signed webhook.
        placed = place(e.pb.PAYMENT_PROVIDER_STRIPE)
        pi = placed.payment.reference
        assert pi.startswith("pi_") and placed.payment.client_secret.startswith(pi + "_secret_")
        fake(stripe_port, "/_fake/pay", {"id": pi})
        tampered = subprocess.run(["scripts/send-webhook", "stripe", "payment_intent.succeeded", pi,
                                   "--tamper", "--to", "127.0.0.1:%d" % http_port],
                                  cwd=e.REPO, capture_output=True, text=True)
        assert tampered.returncode == 1 and "HTTP 400" in tampered.stdout, tampered
        got = api.call("GetOrder", e.pb.GetOrderRequest(order_id=placed.order.order_id), token)
        assert got.status == e.pb.ORDER_STATUS_PENDING
        sent = subprocess.run(["scripts/send-webhook", "stripe", "payment_intent.succeeded", pi,
                               "--to", "127.0.0.1:%d" % http_port], cwd=e.REPO, capture_output=True, text=True)
        assert sent.returncode == 0 and "HTTP 200" in sent.stdout, sent
        got = api.call("GetOrder", e.pb.GetOrderRequest(order_id=placed.order.order_id), token)
        assert got.status == e.pb.ORDER_STATUS_PAID
        assert got.payment.charge_id.startswith("ch_")

        # ...and cancelling the paid order refunds it.
        cancelled = api.call("CancelOrder", e.pb.CancelOrderRequest(order_id=got.order_id, reason="demo"), token)
        assert cancelled.status == e.pb.ORDER_STATUS_CANCELLED
        assert cancelled.payment.status == e.pb.PAYMENT_STATUS_REFUNDED
        assert cancelled.payment.refund_id.startswith("re_")

        # PayPal: the payer approves, ConfirmPayment captures.
        placed = place(e.pb.PAYMENT_PROVIDER_PAYPAL)
        assert placed.payment.approval_url.startswith("https://")
        fake(paypal_port, "/_fake/pay", {"id": placed.payment.reference})
        paid = api.call("ConfirmPayment", e.pb.ConfirmPaymentRequest(
            order_id=placed.order.order_id, provider=e.pb.PAYMENT_PROVIDER_PAYPAL,
            payment_reference=placed.payment.reference), token)
        assert paid.status == e.pb.ORDER_STATUS_PAID and paid.payment.charge_id
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground group
        try:
            rc = run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            rc = run.wait()
        log.close()

    assert rc == 0, "run.sh after Ctrl-C: status %s\n%s" % (rc, e.tail(str(log_path)))
    left = {pid: cmd for pid, cmd in processes_of_checkout().items() if pid not in before}
    assert not left, "still running after Ctrl-C: %s" % left
    for port in (grpc_port, http_port, stripe_port, paypal_port):
        assert not listening(port), "127.0.0.1:%d still listening after Ctrl-C" % port
    assert "left running" in log_path.read_text(), "run.sh found the stack running and must leave it"
