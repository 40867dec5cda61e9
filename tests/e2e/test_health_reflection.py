"""grpc.health.v1 (Check, Watch, NOT_SERVING without PostgreSQL) and server reflection
(v1 and v1alpha), driven the way grpcurl `list` / `describe` / dynamic calls drive them."""

import queue

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

import orderd_e2e as e2e
from orderd_e2e import pb, health_pb2, expect_error

HC = health_pb2.HealthCheckResponse
REFLECTION = {"v1": e2e.refl_v1_pb2, "v1alpha": e2e.refl_v1alpha_pb2}


# ---------------------------------------------------------------------------------------
# health


@pytest.mark.parametrize("service", ["", "orders.v1.OrderService"])
def test_health_check_serving_without_a_token(orderd, service):
    assert e2e.health_check(orderd.server.channel, service) == HC.SERVING


def test_health_check_unknown_service_is_not_found(orderd):
    try:
        e2e.health_check(orderd.server.channel, "no.such.Service")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        return
    raise AssertionError("Check of an unknown service answered instead of NOT_FOUND")


def _watch(channel, service):
    stub = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=HC.FromString)
    return stub(health_pb2.HealthCheckRequest(service=service), timeout=e2e.TIMEOUT)


@pytest.mark.parametrize("service,want", [("", HC.SERVING),
                                          ("orders.v1.OrderService", HC.SERVING),
                                          ("no.such.Service", HC.SERVICE_UNKNOWN)])
def test_health_watch_streams_the_current_status_first(orderd, service, want):
    call = _watch(orderd.server.channel, service)
    try:
        first = next(call)
        assert first.status == want
    finally:
        call.cancel()


def test_without_postgres_the_server_starts_not_serving_and_answers_unavailable(orderd):
    env = dict(orderd.env)
    env["ORDERD_POSTGRES_DSN"] = ("host=127.0.0.1 port=1 dbname=orderd_e2e user=orderd "
                                  "connect_timeout=2")
    srv = e2e.Orderd(env, orderd.logdir, "orderd-no-postgres").start()
    try:
        srv.wait_health(None, timeout=20)
        assert e2e.health_check(srv.channel, "") == HC.NOT_SERVING, srv.log_tail()
        assert e2e.health_check(srv.channel, "orders.v1.OrderService") == HC.NOT_SERVING
        watch = _watch(srv.channel, "")
        try:
            assert next(watch).status == HC.NOT_SERVING
        finally:
            watch.cancel()
        api = e2e.Api(srv.channel)
        cust = orderd.customer()
        for method, req in [
            ("GetOrder", pb.GetOrderRequest(order_id="6f1c1f3e-8f0e-4c4e-9d3b-2a1f0e9c8b7a")),
            ("PlaceOrder", orderd.place_request([(orderd.pid("widget"), 1)])),
            ("ListOrders", pb.ListOrdersRequest()),
            ("GetProduct", pb.GetProductRequest(product_id=orderd.pid("widget"))),
        ]:
            err = expect_error(lambda: api.call(method, req, cust.token, timeout=5.0),
                               grpc.StatusCode.UNAVAILABLE)
            assert err is not None, method
        # Authentication still comes first.
        expect_error(lambda: api.call("GetOrder", pb.GetOrderRequest(order_id="x"), None,
                                      timeout=5.0), grpc.StatusCode.UNAUTHENTICATED)
    finally:
        rc = srv.stop(timeout=15)
    assert rc == 0, "orderd without PostgreSQL: exit %s after SIGTERM\n%s" % (rc, srv.log_tail())


# ---------------------------------------------------------------------------------------
# reflection


class Reflection:
    """One ServerReflectionInfo stream, used request by request like grpcurl does."""

    def __init__(self, channel, version, token):
        self.mod = REFLECTION[version]
        stub = channel.stream_stream(
            "/grpc.reflection.%s.ServerReflection/ServerReflectionInfo" % version,
            request_serializer=self.mod.ServerReflectionRequest.SerializeToString,
            response_deserializer=self.mod.ServerReflectionResponse.FromString)
        self.q = queue.Queue()
        md = [("authorization", "Bearer " + token)] if token else []
        self.call = stub(iter(self.q.get, None), metadata=md, timeout=e2e.TIMEOUT)

    def ask(self, **kw):
        req = self.mod.ServerReflectionRequest(**kw)
        self.q.put(req)
        return next(self.call)

    def close(self):
        self.q.put(None)
        rest = list(self.call)
        assert rest == []
        assert self.call.code() == grpc.StatusCode.OK, self.call.details()

    def files(self, **kw):
        resp = self.ask(**kw)
        kind = resp.WhichOneof("message_response")
        assert kind == "file_descriptor_response", (kw, resp)
        return [descriptor_pb2.FileDescriptorProto.FromString(b)
                for b in resp.file_descriptor_response.file_descriptor_proto]

    def pool_for(self, symbol):
        """What grpcurl describe does: the file with the symbol, then every dependency
        (asked for by file name unless already sent), into a fresh descriptor pool."""
        files = {}
        for f in self.files(file_containing_symbol=symbol):
            files[f.name] = f
        todo = list(files.values())
        while todo:
            f = todo.pop()
            for dep in f.dependency:
                if dep not in files:
                    for g in self.files(file_by_filename=dep):
                        if g.name not in files:
                            files[g.name] = g
                            todo.append(g)
                    assert dep in files, "file_by_filename(%s) did not return it" % dep
        pool = descriptor_pool.DescriptorPool()
        added = set()

        def add(name):
            if name in added:
                return
            for dep in files[name].dependency:
                add(dep)
            pool.Add(files[name])
            added.add(name)

        for name in files:
            add(name)
        return pool, files


@pytest.fixture(params=["v1", "v1alpha"])
def reflection(request, orderd):
    r = Reflection(orderd.server.channel, request.param, orderd.admin.token)
    yield r
    r.close()


def test_reflection_lists_the_services(reflection):
    resp = reflection.ask(list_services="")
    names = {s.name for s in resp.list_services_response.service}
    assert {"orders.v1.OrderService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names, names


def _fields(msg_desc):
    return sorted((f.name, f.number, f.type, f.label,
                   f.message_type.full_name if f.message_type else "",
                   f.enum_type.full_name if f.enum_type else "")
                  for f in msg_desc.fields)


def test_reflection_describes_the_service_like_grpcurl(reflection):
    pool, files = reflection.pool_for("orders.v1.OrderService")
    assert "orders/v1/orders.proto" in files
    assert "google/protobuf/timestamp.proto" in files
    assert "google/protobuf/wrappers.proto" in files
    svc = pool.FindServiceByName("orders.v1.OrderService")
    place = svc.FindMethodByName("PlaceOrder")
    assert place.input_type.full_name == "orders.v1.PlaceOrderRequest"
    assert place.output_type.full_name == "orders.v1.PlaceOrderResponse"
    ours = pb.DESCRIPTOR.services_by_name["OrderService"]
    assert sorted((m.name, m.input_type.full_name, m.output_type.full_name)
                  for m in svc.methods) == \
        sorted((m.name, m.input_type.full_name, m.output_type.full_name)
               for m in ours.methods)
    # The served contract is the contract in proto/: same messages, same fields.
    for name, ours_msg in pb.DESCRIPTOR.message_types_by_name.items():
        served = pool.FindMessageTypeByName("orders.v1." + name)
        assert _fields(served) == _fields(ours_msg), name
    for name, ours_enum in pb.DESCRIPTOR.enum_types_by_name.items():
        served = pool.FindEnumTypeByName("orders.v1." + name)
        assert [(v.name, v.number) for v in served.values] == \
            [(v.name, v.number) for v in ours_enum.values], name


@pytest.mark.parametrize("symbol,filename", [
    ("orders.v1.Order", "orders/v1/orders.proto"),
    ("orders.v1.OrderService.PlaceOrder", "orders/v1/orders.proto"),
    ("orders.v1.OrderStatus", "orders/v1/orders.proto"),
    ("grpc.health.v1.Health", "grpc/health/v1/health.proto"),
])
def test_reflection_finds_files_by_symbol(reflection, symbol, filename):
    files = reflection.files(file_containing_symbol=symbol)
    assert files and files[0].name == filename, [f.name for f in files]


def test_reflection_unknown_symbol_is_not_found_and_the_stream_goes_on(reflection):
    resp = reflection.ask(file_containing_symbol="orders.v1.NoSuchThing")
    assert resp.WhichOneof("message_response") == "error_response"
    assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    resp = reflection.ask(file_by_filename="no/such/file.proto")
    assert resp.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    resp = reflection.ask(list_services="")
    assert resp.WhichOneof("message_response") == "list_services_response"
    assert reflection.files(file_containing_symbol="orders.v1.Product")[0].name == \
        "orders/v1/orders.proto"


def _message_class(pool, desc):
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


def test_a_dynamic_call_built_from_reflection_alone(reflection, orderd):
    pool, _ = reflection.pool_for("orders.v1.OrderService")
    method = pool.FindMethodByName("orders.v1.OrderService.GetProduct")
    Req = _message_class(pool, method.input_type)
    Resp = _message_class(pool, method.output_type)
    assert Req is not pb.GetProductRequest
    req = Req()
    json_format.Parse('{"product_id": "%s"}' % orderd.pid("widget"), req)
    call = orderd.server.channel.unary_unary(
        "/%s/%s" % (method.containing_service.full_name, method.name),
        request_serializer=Req.SerializeToString, response_deserializer=Resp.FromString)
    resp = call(req, timeout=e2e.TIMEOUT,
                 metadata=[("authorization", "Bearer " + orderd.admin.token)])
    assert json_format.MessageToDict(resp, preserving_proto_field_name=True) == {
        "product_id": orderd.pid("widget"), "name": "Widget", "unit_price_minor": "1000",
        "currency": "EUR", "active": True}


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize("who,code", [(None, grpc.StatusCode.UNAUTHENTICATED),
                                      ("customer", grpc.StatusCode.PERMISSION_DENIED),
                                      ("service", grpc.StatusCode.PERMISSION_DENIED)])
def test_reflection_needs_an_admin_token(orderd, version, who, code):
    token = None
    if who is not None:
        token = orderd.caller(e2e.unique("e2e-" + who), [who]).token
    r = Reflection(orderd.server.channel, version, token)
    try:
        r.ask(list_services="")
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
    else:
        raise AssertionError("reflection answered %s without an admin token" % who)
    finally:
        r.q.put(None)
