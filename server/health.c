/* health.c — grpc.health.v1.Health: Check and Watch, and the monitor that decides.
 *
 * orderd is SERVING while PostgreSQL answers and NOT_SERVING otherwise (and from the
 * moment a shutdown starts, so load balancers stop sending). A monitor thread with its
 * own connection probes PostgreSQL once a second; Check reads the result, Watch streams
 * every change. Health needs no token and is never rate-limited.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "grpc/health/v1/health.pb-c.h"
#include "server/internal.h"
#include "storage/storage.h"

#define SERVING           GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
#define NOT_SERVING       GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
#define SERVICE_UNKNOWN   GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN
#define PROBE_INTERVAL_MS 1000

/* The services whose health we report: the whole server ("") and the order service. */
static bool service_known(const char *name)
{
    return name[0] == '\0' || strcmp(name, "orders.v1.OrderService") == 0 ||
           strcmp(name, "grpc.health.v1.Health") == 0;
}

static int current_status(srv_server *srv)
{
    if (atomic_load(&srv->draining) || atomic_load(&srv->shutting_down))
        return NOT_SERVING;
    return atomic_load(&srv->health);
}

static grpc_byte_buffer *pack_status(int status)
{
    Grpc__Health__V1__HealthCheckResponse resp;
    grpc__health__v1__health_check_response__init(&resp);
    resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)status;
    return srv_pack(&resp.base);
}

void srv_health_check(srv_call *c, const uint8_t *req, size_t len, srv_reply *r)
{
    Grpc__Health__V1__HealthCheckRequest *m =
        grpc__health__v1__health_check_request__unpack(NULL, len, req);
    if (!m) {
        srv_reply_error(r, GRPC_STATUS_INVALID_ARGUMENT,
                        "the request is not a valid grpc.health.v1.HealthCheckRequest message");
        return;
    }
    if (!service_known(m->service))
        srv_reply_error(r, GRPC_STATUS_NOT_FOUND, "unknown service %s", m->service);
    else
        r->body = pack_status(current_status(c->w->srv));
    grpc__health__v1__health_check_request__free_unpacked(m, NULL);
}

/* ---- Watch: a server stream that sends the status now and at every change ---- */

typedef struct watch {
    bool known;
    bool started;  /* the request arrived */
    int last_sent; /* -1 before the first message */
} watch;

static int watch_status(srv_call *c, const watch *wt)
{
    return wt->known ? current_status(c->w->srv) : SERVICE_UNKNOWN;
}

static void watch_push(srv_call *c)
{
    watch *wt = c->stream_state;
    if (!wt->started || c->send_in_flight || c->status_sent)
        return;
    int st = watch_status(c, wt);
    if (st == wt->last_sent) {
        if (atomic_load(&c->w->srv->shutting_down))
            srv_stream_finish(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        return;
    }
    Grpc__Health__V1__HealthCheckResponse resp;
    grpc__health__v1__health_check_response__init(&resp);
    resp.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)st;
    if (srv_stream_send(c, &resp.base))
        wt->last_sent = st;
}

void srv_health_watch_start(srv_call *c)
{
    watch *wt = calloc(1, sizeof *wt);
    if (!wt) {
        srv_stream_finish(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    wt->last_sent = -1;
    c->stream_state = wt;
    c->stream_free = free;
    if (!srv_stream_recv(c))
        srv_stream_finish(c, GRPC_STATUS_INTERNAL, "cannot read the request");
}

void srv_health_watch_recv(srv_call *c, const uint8_t *msg, size_t len, bool half_closed)
{
    watch *wt = c->stream_state;
    if (wt->started)
        return; /* the client's half-close after its one request */
    if (half_closed) {
        srv_stream_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "the request message is missing");
        return;
    }
    Grpc__Health__V1__HealthCheckRequest *m =
        grpc__health__v1__health_check_request__unpack(NULL, len, msg);
    if (!m) {
        srv_stream_finish(c, GRPC_STATUS_INVALID_ARGUMENT,
                          "the request is not a valid grpc.health.v1.HealthCheckRequest message");
        return;
    }
    wt->known = service_known(m->service);
    wt->started = true;
    grpc__health__v1__health_check_request__free_unpacked(m, NULL);
    watch_push(c);
    srv_stream_recv(c); /* notice the half-close; nothing else is expected */
}

void srv_health_watch_sent(srv_call *c, bool ok)
{
    if (ok)
        watch_push(c); /* the status may have changed while the last one was in flight */
}

void srv_health_watch_tick(srv_call *c)
{
    watch_push(c);
}

/* ---- the monitor ---- */

static void *monitor_main(void *arg)
{
    srv_server *srv = arg;
    char err[256] = "";
    struct store *st =
        store_open(srv->cfg->pg_dsn, srv->cfg->pg_statement_timeout_us, err, sizeof err);
    int last = -1;
    while (!atomic_load(&srv->health_stop)) {
        int now = (st && store_ping(st)) ? SERVING : NOT_SERVING;
        atomic_store(&srv->health, now);
        if (now != last) {
            log_kv(now == SERVING ? LOG_INFO : LOG_WARN, "health changed", LOG_F_STR, "status",
                   now == SERVING ? "SERVING" : "NOT_SERVING", LOG_F_STR, "reason",
                   now == SERVING ? "PostgreSQL answers" : "PostgreSQL is unreachable", LOG_F_END);
            last = now;
        }
        for (int i = 0; i < PROBE_INTERVAL_MS / 50 && !atomic_load(&srv->health_stop); i++)
            usleep(50 * 1000);
    }
    store_close(st);
    return NULL;
}

int srv_health_monitor_start(srv_server *srv)
{
    if (pthread_create(&srv->health_thread, NULL, monitor_main, srv) != 0) {
        log_msgf(LOG_ERROR, "cannot start the health monitor thread");
        return -1;
    }
    return 0;
}

void srv_health_monitor_stop(srv_server *srv)
{
    atomic_store(&srv->health_stop, true);
    pthread_join(srv->health_thread, NULL);
}
