/* http.c — the HTTP side port (libmicrohttpd): payment provider webhooks, Prometheus
 * metrics and a health probe for load balancers and orchestrators.
 *
 *   POST /webhooks/stripe   Stripe event, verified with the endpoint secret (Stripe-Signature)
 *   POST /webhooks/paypal   PayPal event, verified through PayPal's API (PAYPAL-* headers)
 *   GET  /metrics           Prometheus text format 0.0.4 (metrics.c)
 *   GET  /healthz           200 {"status":"SERVING"} or 503 with the status name
 *
 * DESIGN
 * MHD gives every connection a thread of its own (up to HTTP_MAX_CONNECTIONS), so a
 * webhook that blocks in libpq or libcurl (PayPal's verification, a refund) holds up only
 * its own connection: /healthz and /metrics never wait behind one. Webhooks need the
 * domain, and a domain service owns a database connection that must not be shared between
 * threads: they come from a pool of at most http.threads (http_slot), opened on first use,
 * taken by the connection thread that handles a webhook and given back when it is done.
 * When every slot is busy a webhook waits up to WEBHOOK_SLOT_WAIT_US, then answers 503
 * (the providers retry). A slot whose srv_bg_open failed tries again at most once a
 * second, answering 503 meanwhile. srv_http_stop closes every slot once MHD_stop_daemon
 * has joined the threads.
 *
 * Answers follow what the providers do with them: a 2xx ends the delivery, anything else
 * is retried later (Stripe for days, PayPal up to 25 times). So an event that can never
 * apply (unknown order, already applied, no longer applicable) is acknowledged with 200,
 * a bad signature or unreadable body is 400, and only transient trouble (database down,
 * deadline, a lost race, PayPal's verification API down) is 503 (500 for a bug).
 * Error bodies are fixed short strings: nothing from the request, the provider or a
 * secret is echoed; the details go to the access log, which never holds the body or the
 * signature either.
 *
 * Bodies are kept byte for byte (signatures are over the raw bytes) up to
 * http.max_body_bytes: a longer Content-Length is refused with 413 before any of the body
 * is read; a chunked body is counted as it comes (see on_request).
 *
 * Lifetimes: srv_http_start must run after the workers, the rate limiter, the relay and
 * the consumer exist (GET /metrics reads them from MHD's threads), and srv_http_stop
 * before any of them goes away.
 */
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/metrics.h"
#include "payments/payments.h"
#include "server/internal.h"

#define HTTP_TIMEOUT_S       10          /* an idle connection is closed after this */
#define HTTP_MAX_CONNECTIONS 256         /* shared by the pool's threads */
#define HTTP_CONN_MEMORY     (64 * 1024) /* per connection: headers and I/O buffers */
#define WEBHOOK_DEADLINE_US  (10 * 1000000LL)
#define WEBHOOK_SLOT_WAIT_US (5 * 1000000LL) /* longest wait for a free domain service */
#define BG_RETRY_US          1000000         /* a thread retries srv_bg_open at most this often */
#define BG_ACTOR             "webhooks"      /* history rows' "who" for webhook transitions */

/* A domain service for webhooks, taken by one connection thread at a time (see DESIGN). */
typedef struct http_slot http_slot;
struct http_slot {
    srv_bg *bg;                /* NULL until first used, or after a failed open */
    int64_t next_open_mono_us; /* no srv_bg_open before this, after a failure */
    order_error err;           /* the context's error slot; large, so not on the stack */
    http_slot *next;           /* every slot */
    http_slot *next_free;      /* the free list */
};

struct srv_http {
    srv_server *srv;
    struct MHD_Daemon *d;
    char *stripe_secret; /* NUL-terminated copy of the endpoint secret; NULL = none */
    unsigned port;
    pthread_mutex_t mu;   /* guards the slots and start_err */
    pthread_cond_t freed; /* a slot was given back (CLOCK_MONOTONIC) */
    http_slot *slots;     /* every slot made */
    http_slot *free;      /* those not in use */
    unsigned nslots, max_slots;
    bool starting; /* MHD's messages go to start_err, for srv_http_start's err */
    char start_err[256];
};

typedef enum route { ROUTE_NONE, ROUTE_STRIPE, ROUTE_PAYPAL, ROUTE_HEALTH, ROUTE_METRICS } route;

/* One request, from its first handler call to MHD's completion callback. */
typedef struct http_req {
    int64_t start_mono_us;
    route route;
    char method[16];
    char path[256];
    char *body; /* the raw bytes, exactly as sent, NUL-terminated for safety */
    size_t len, cap;
    bool too_large;   /* more than http_max_body_bytes arrived: discarded, 413 */
    size_t discarded; /* bytes dropped since */
    unsigned status;  /* 0 until a response is queued */
    /* webhooks, for the access log and the metrics */
    const char *provider; /* "stripe" | "paypal" */
    const char *result;   /* orderd_webhooks_total's result, or NULL if not counted */
    char detail[384];     /* why, for the log (never the body or a signature) */
    char order_id[ORDER_ID_LEN + 1];
    order_payment_event ev;
} http_req;

/* ---- responses ---- */

static enum MHD_Result respond(struct MHD_Connection *c, http_req *r, unsigned status,
                               const char *ctype, const char *body, bool take_body, size_t len,
                               const char *allow)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(
        len, (void *)body, take_body ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_MUST_COPY);
    if (!resp) {
        if (take_body)
            free((void *)body);
        return MHD_NO;
    }
    if (ctype)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (allow)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result ok = MHD_queue_response(c, status, resp);
    MHD_destroy_response(resp);
    if (ok == MHD_YES)
        r->status = status;
    return ok;
}

static enum MHD_Result respond_json(struct MHD_Connection *c, http_req *r, unsigned status,
                                    const char *json)
{
    return respond(c, r, status, "application/json", json, false, strlen(json), NULL);
}

/* {"error":"<msg>"}; msg is one of this file's constants (nothing to escape). */
static enum MHD_Result respond_error(struct MHD_Connection *c, http_req *r, unsigned status,
                                     const char *msg)
{
    char body[160];
    snprintf(body, sizeof body, "{\"error\":\"%s\"}", msg);
    return respond_json(c, r, status, body);
}

static enum MHD_Result respond_405(struct MHD_Connection *c, http_req *r, const char *allow)
{
    static const char body[] = "{\"error\":\"method not allowed\"}";
    return respond(c, r, MHD_HTTP_METHOD_NOT_ALLOWED, "application/json", body, false,
                   sizeof body - 1, allow);
}

/* ---- the webhooks' domain services ---- */

/* A free slot, or a new one while there are fewer than max_slots; waits for one to be
 * given back otherwise. NULL with r->detail set when none came in time. */
static http_slot *slot_wait(srv_http *h, http_req *r)
{
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += WEBHOOK_SLOT_WAIT_US / 1000000;
    http_slot *t = NULL;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        if (h->free) {
            t = h->free;
            h->free = t->next_free;
            break;
        }
        if (h->nslots < h->max_slots) {
            t = calloc(1, sizeof *t);
            if (t) {
                t->next = h->slots;
                h->slots = t;
                h->nslots++;
            } else {
                snprintf(r->detail, sizeof r->detail, "out of memory");
            }
            break;
        }
        if (pthread_cond_timedwait(&h->freed, &h->mu, &until) != 0 && !h->free) {
            snprintf(r->detail, sizeof r->detail,
                     "all %u webhook domain services stayed busy (http.threads)", h->max_slots);
            break;
        }
    }
    pthread_mutex_unlock(&h->mu);
    return t;
}

static void slot_give(srv_http *h, http_slot *t)
{
    if (!t)
        return;
    pthread_mutex_lock(&h->mu);
    t->next_free = h->free;
    h->free = t;
    pthread_cond_signal(&h->freed);
    pthread_mutex_unlock(&h->mu);
}

/* A slot with its service open, for this request (give it back with slot_give); NULL with
 * r->detail set if none can be had now. */
static http_slot *slot_take(srv_http *h, http_req *r)
{
    http_slot *t = slot_wait(h, r);
    if (!t || t->bg)
        return t;
    int64_t now = clock_mono_us();
    if (now < t->next_open_mono_us) {
        snprintf(r->detail, sizeof r->detail,
                 "the domain service could not be opened a moment ago; retrying later");
        slot_give(h, t);
        return NULL;
    }
    char err[256] = "";
    t->bg = srv_bg_open(h->srv, BG_ACTOR, err, sizeof err);
    if (!t->bg) {
        t->next_open_mono_us = now + BG_RETRY_US;
        log_kv(LOG_WARN, "http: cannot open the domain service for webhooks", LOG_F_STR, "error",
               err, LOG_F_END);
        snprintf(r->detail, sizeof r->detail, "cannot open the domain service: %s", err);
        slot_give(h, t);
        return NULL;
    }
    return t;
}

/* ---- webhooks ---- */

/* Records the outcome for the log and the metrics. */
static void webhook_result(http_req *r, const char *result)
{
    r->result = result;
    srv__metrics_webhook(r->provider, result);
}

/* Answers a verification failure (a PAY_WEBHOOK_* code other than OK). */
static enum MHD_Result webhook_refused(struct MHD_Connection *c, http_req *r, int rc)
{
    switch (rc) {
    case PAY_WEBHOOK_BAD_SIGNATURE:
        webhook_result(r, "bad_signature");
        return respond_error(c, r, MHD_HTTP_BAD_REQUEST, "signature verification failed");
    case PAY_WEBHOOK_MALFORMED:
        webhook_result(r, "malformed");
        return respond_error(c, r, MHD_HTTP_BAD_REQUEST, "malformed event");
    case PAY_WEBHOOK_UNAVAILABLE:
        webhook_result(r, "unavailable");
        return respond_error(c, r, MHD_HTTP_SERVICE_UNAVAILABLE, "cannot verify the event now");
    default:
        webhook_result(r, "error");
        return respond_error(c, r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal error");
    }
}

static enum MHD_Result webhook_unavailable(struct MHD_Connection *c, http_req *r)
{
    webhook_result(r, "unavailable");
    return respond_error(c, r, MHD_HTTP_SERVICE_UNAVAILABLE, "temporarily unavailable");
}

/* Applies a verified event through the domain and answers (see DESIGN for the mapping).
 * bg and ctx: NULL to take a slot here (Stripe), or PayPal's slot's, whose deadline covers
 * both the verification and this. */
static enum MHD_Result webhook_apply(srv_http *h, struct MHD_Connection *c, http_req *r, srv_bg *bg,
                                     order_ctx *ctx)
{
    const order_payment_event *ev = &r->ev;
    if (ev->order_id[0])
        snprintf(r->order_id, sizeof r->order_id, "%s", ev->order_id);
    if (ev->kind == ORDER_PAY_EVENT_IGNORED) {
        webhook_result(r, "ignored");
        return respond_json(c, r, MHD_HTTP_OK, "{\"received\":true}");
    }
    order_ctx own;
    http_slot *mine = NULL;
    if (!bg) {
        mine = slot_take(h, r);
        if (!mine)
            return webhook_unavailable(c, r);
        bg = mine->bg;
        own = srv_bg_ctx(bg, &mine->err, WEBHOOK_DEADLINE_US);
        ctx = &own;
    }
    order_t o;
    memset(&o, 0, sizeof o);
    bool changed = false;
    int rc = order_apply_payment_event(srv_bg_service(bg), ctx, ev, &o, &changed);
    if (o.id[0])
        snprintf(r->order_id, sizeof r->order_id, "%s", o.id);
    order_clear(&o);
    if (rc != ORDER_OK)
        snprintf(r->detail, sizeof r->detail, "%s: %s", order_code_name(rc), ctx->err->message);
    slot_give(h, mine);

    switch (rc) {
    case ORDER_OK: /* applied, or already reflected (ConfirmPayment got there first) */
        webhook_result(r, changed ? "applied" : "ignored");
        break;
    case ORDER_EDUPLICATE:
        webhook_result(r, "duplicate");
        break;
    case ORDER_ENOTFOUND:     /* names no order of ours */
    case ORDER_EPRECONDITION: /* the event no longer applies to the order */
    case ORDER_EINVAL:        /* can never apply: retrying would not help */
        webhook_result(r, "ignored");
        break;
    case ORDER_EUNAVAILABLE:
    case ORDER_EDEADLINE:
    case ORDER_EABORTED:
        return webhook_unavailable(c, r);
    default:
        webhook_result(r, "error");
        return respond_error(c, r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal error");
    }
    return respond_json(c, r, MHD_HTTP_OK, "{\"received\":true}");
}

static enum MHD_Result webhook_stripe(srv_http *h, struct MHD_Connection *c, http_req *r)
{
    const srv_config *cfg = h->srv->cfg;
    if (!h->stripe_secret) {
        /* Not counted as a webhook: nothing was looked at. 503 if Stripe is on (a
         * configuration mistake to fix; Stripe keeps the event and retries), 404 if off. */
        snprintf(r->detail, sizeof r->detail, "payments.stripe.webhook_secret is not set");
        return cfg->stripe_enabled
                   ? respond_error(c, r, MHD_HTTP_SERVICE_UNAVAILABLE,
                                   "stripe webhooks are not configured")
                   : respond_error(c, r, MHD_HTTP_NOT_FOUND, "stripe webhooks are not enabled");
    }
    const char *sig = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Stripe-Signature");
    if (!sig || !*sig) {
        snprintf(r->detail, sizeof r->detail, "no Stripe-Signature header");
        return webhook_refused(c, r, PAY_WEBHOOK_BAD_SIGNATURE);
    }
    int64_t tolerance_s = cfg->stripe_webhook_tolerance_us / 1000000;
    int64_t now_s = clock_wall_us() / 1000000;
    int rc = pay_stripe_webhook(h->stripe_secret, tolerance_s, now_s, sig, r->body ? r->body : "",
                                r->len, &r->ev, r->detail, sizeof r->detail);
    if (rc != PAY_WEBHOOK_OK)
        return webhook_refused(c, r, rc);
    return webhook_apply(h, c, r, NULL, NULL);
}

static enum MHD_Result webhook_paypal_with(srv_http *h, struct MHD_Connection *c, http_req *r,
                                           http_slot *t);

static enum MHD_Result webhook_paypal(srv_http *h, struct MHD_Connection *c, http_req *r)
{
    const srv_config *cfg = h->srv->cfg;
    if (!cfg->paypal_enabled) {
        snprintf(r->detail, sizeof r->detail, "payments.paypal.enabled is false");
        return respond_error(c, r, MHD_HTTP_NOT_FOUND, "paypal webhooks are not enabled");
    }
    if (!cfg->paypal_webhook_id[0]) {
        snprintf(r->detail, sizeof r->detail, "payments.paypal.webhook_id is not set");
        return respond_error(c, r, MHD_HTTP_SERVICE_UNAVAILABLE,
                             "paypal webhooks are not configured");
    }
    http_slot *t = slot_take(h, r);
    if (!t)
        return webhook_unavailable(c, r);
    enum MHD_Result res = webhook_paypal_with(h, c, r, t);
    slot_give(h, t);
    return res;
}

/* The PayPal webhook, holding slot t: verified through PayPal, then applied. */
static enum MHD_Result webhook_paypal_with(srv_http *h, struct MHD_Connection *c, http_req *r,
                                           http_slot *t)
{
    const srv_config *cfg = h->srv->cfg;
    srv_bg *bg = t->bg;
    order_payments *paypal = srv_bg_provider(bg, ORDER_PROVIDER_PAYPAL);
    if (!paypal) {
        snprintf(r->detail, sizeof r->detail, "the PayPal provider is not configured");
        return webhook_unavailable(c, r);
    }
    /* MHD compares header names without regard to case. */
    pay_paypal_headers hd = {
        .auth_algo = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "PAYPAL-AUTH-ALGO"),
        .cert_url = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "PAYPAL-CERT-URL"),
        .transmission_id =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, "PAYPAL-TRANSMISSION-ID"),
        .transmission_sig =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, "PAYPAL-TRANSMISSION-SIG"),
        .transmission_time =
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, "PAYPAL-TRANSMISSION-TIME"),
    };
    order_ctx ctx = srv_bg_ctx(bg, &t->err, WEBHOOK_DEADLINE_US);
    int rc = pay_paypal_webhook(paypal, &ctx, cfg->paypal_webhook_id, &hd, r->body ? r->body : "",
                                r->len, &r->ev, r->detail, sizeof r->detail);
    if (rc != PAY_WEBHOOK_OK)
        return webhook_refused(c, r, rc);
    return webhook_apply(h, c, r, bg, &ctx);
}

/* ---- health and metrics ---- */

static enum MHD_Result serve_health(srv_http *h, struct MHD_Connection *c, http_req *r)
{
    /* grpc.health.v1 ServingStatus numbers; a shutdown in progress is NOT_SERVING, as for
     * the gRPC health service. */
    static const char *const names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    srv_server *srv = h->srv;
    enum { SERVING = 1, NOT_SERVING = 2 };
    int st = atomic_load(&srv->health);
    if (atomic_load(&srv->draining) || atomic_load(&srv->shutting_down))
        st = NOT_SERVING;
    const char *name = st >= 0 && st < 4 ? names[st] : "UNKNOWN";
    char body[64];
    snprintf(body, sizeof body, "{\"status\":\"%s\"}", name);
    return respond_json(c, r, st == SERVING ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, body);
}

static enum MHD_Result serve_metrics(srv_http *h, struct MHD_Connection *c, http_req *r)
{
    metrics_buf b;
    metrics_buf_init(&b);
    if (srv__metrics_render(h->srv, &b) != 0) {
        metrics_buf_dispose(&b);
        snprintf(r->detail, sizeof r->detail, "out of memory");
        return respond(c, r, MHD_HTTP_INTERNAL_SERVER_ERROR, "text/plain", "", false, 0, NULL);
    }
    size_t len;
    char *text = metrics_buf_take(&b, &len);
    return respond(c, r, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text, true, len,
                   NULL);
}

/* ---- the MHD callbacks ---- */

static route route_of(const char *url)
{
    if (strcmp(url, "/webhooks/stripe") == 0)
        return ROUTE_STRIPE;
    if (strcmp(url, "/webhooks/paypal") == 0)
        return ROUTE_PAYPAL;
    if (strcmp(url, "/healthz") == 0)
        return ROUTE_HEALTH;
    if (strcmp(url, "/metrics") == 0)
        return ROUTE_METRICS;
    return ROUTE_NONE;
}

/* Appends upload data, or counts it as too much: a body over the limit is never buffered.
 * Returns false when the request is to be cut off instead (see on_request). */
static bool body_append(srv_http *h, http_req *r, const char *data, size_t n)
{
    size_t max = (size_t)h->srv->cfg->http_max_body_bytes;
    if (r->too_large || n > max - r->len) {
        r->too_large = true;
        r->discarded += n;
        return r->len + r->discarded <= 2 * max; /* more than twice the limit: cut off */
    }
    if (r->len + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + n + 1)
            cap *= 2;
        if (cap > max + 1)
            cap = max + 1;
        char *p = realloc(r->body, cap);
        if (!p) {
            r->too_large = true; /* answered 413: better than taking the process down */
            return true;
        }
        r->body = p;
        r->cap = cap;
    }
    memcpy(r->body + r->len, data, n);
    r->len += n;
    r->body[r->len] = '\0';
    return true;
}

/* The request's declared length; -1 if none (chunked). */
static long long content_length(struct MHD_Connection *c)
{
    const char *v = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (!v)
        return -1;
    char *end;
    long long n = strtoll(v, &end, 10);
    return end != v && *end == '\0' && n >= 0 ? n : -1;
}

/* First call of a request: route it, answer what needs no body. */
static enum MHD_Result on_first_call(srv_http *h, struct MHD_Connection *c, http_req *r,
                                     const char *method)
{
    bool get =
        strcmp(method, MHD_HTTP_METHOD_GET) == 0 || strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    bool post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
    switch (r->route) {
    case ROUTE_STRIPE:
    case ROUTE_PAYPAL: {
        r->provider = r->route == ROUTE_STRIPE ? "stripe" : "paypal";
        if (!post)
            return respond_405(c, r, "POST");
        long long n = content_length(c);
        if (n > (long long)h->srv->cfg->http_max_body_bytes) {
            /* Refused before a byte of the body is read (and before "100 Continue"). */
            snprintf(r->detail, sizeof r->detail, "body of %lld bytes over the limit of %d", n,
                     h->srv->cfg->http_max_body_bytes);
            return respond_error(c, r, MHD_HTTP_CONTENT_TOO_LARGE, "request body too large");
        }
        return MHD_YES; /* the body comes in the next calls */
    }
    case ROUTE_HEALTH:
    case ROUTE_METRICS:
        if (!get)
            return respond_405(c, r, "GET, HEAD");
        /* Answered on the next call, once MHD knows the request is complete: an answer
         * queued now would make it close the connection instead of keeping it alive. */
        return MHD_YES;
    case ROUTE_NONE:
    default:
        return respond_error(c, r, MHD_HTTP_NOT_FOUND, "not found");
    }
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **req_cls)
{
    srv_http *h = cls;
    http_req *r = *req_cls;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r)
            return MHD_NO;
        *req_cls = r;
        r->start_mono_us = clock_mono_us();
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->path, sizeof r->path, "%s", url);
        r->route = route_of(url);
        return on_first_call(h, c, r, method);
    }
    if (r->status) { /* answered already (the body is being discarded) */
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size > 0) {
        /* MHD 0.9.75 takes no response before the upload ends, so a body that announced no
         * length (chunked) and runs over the limit is read and dropped, and answered 413 at
         * its end; one that keeps coming for another limit's worth is cut off. A body
         * announced too long never gets here: it is refused on the first call. */
        bool go_on = body_append(h, r, upload, *upload_size);
        *upload_size = 0;
        if (!go_on)
            snprintf(r->detail, sizeof r->detail,
                     "chunked body far over the limit of %d bytes: connection closed",
                     h->srv->cfg->http_max_body_bytes);
        return go_on ? MHD_YES : MHD_NO;
    }
    /* The whole body is in. */
    if (r->too_large) {
        snprintf(r->detail, sizeof r->detail, "body over the limit of %d bytes",
                 h->srv->cfg->http_max_body_bytes);
        return respond_error(c, r, MHD_HTTP_CONTENT_TOO_LARGE, "request body too large");
    }
    switch (r->route) {
    case ROUTE_STRIPE:
        return webhook_stripe(h, c, r);
    case ROUTE_PAYPAL:
        return webhook_paypal(h, c, r);
    case ROUTE_HEALTH:
        return serve_health(h, c, r);
    case ROUTE_METRICS:
        return serve_metrics(h, c, r);
    case ROUTE_NONE:
    default:
        return respond_error(c, r, MHD_HTTP_NOT_FOUND, "not found"); /* answered on call 1 */
    }
}

/* The access log line, and the request's memory. */
static void on_completed(void *cls, struct MHD_Connection *c, void **req_cls,
                         enum MHD_RequestTerminationCode toe)
{
    http_req *r = *req_cls;
    if (!r)
        return;
    *req_cls = NULL;
    unsigned st = r->status;
    log_level lvl = st >= 500 ? (st == MHD_HTTP_SERVICE_UNAVAILABLE ? LOG_WARN : LOG_ERROR)
                    : st == 0 ? LOG_WARN
                              : LOG_INFO;
    if (log_enabled(lvl)) {
        static const char *const ends[] = {
            [MHD_REQUEST_TERMINATED_COMPLETED_OK] = NULL,
            [MHD_REQUEST_TERMINATED_WITH_ERROR] = "error",
            [MHD_REQUEST_TERMINATED_TIMEOUT_REACHED] = "timeout",
            [MHD_REQUEST_TERMINATED_DAEMON_SHUTDOWN] = "shutdown",
            [MHD_REQUEST_TERMINATED_READ_ERROR] = "read error",
            [MHD_REQUEST_TERMINATED_CLIENT_ABORT] = "client abort",
        };
        const char *end = (unsigned)toe < sizeof ends / sizeof *ends ? ends[toe] : "unknown";
        double ms = (double)(clock_mono_us() - r->start_mono_us) / 1000.0;
        bool hook = r->provider != NULL;
        log_kv(lvl, "http", LOG_F_STR, "method", r->method, LOG_F_STR, "path", r->path, LOG_F_INT,
               "status", (int64_t)st, LOG_F_DBL, "duration_ms", ms, LOG_F_STR, "provider",
               r->provider, LOG_F_STR, "event_id", hook && r->ev.id[0] ? r->ev.id : NULL, LOG_F_STR,
               "event_type", hook && r->ev.type[0] ? r->ev.type : NULL, LOG_F_STR, "order_id",
               r->order_id[0] ? r->order_id : NULL, LOG_F_STR, "result", r->result, LOG_F_STR,
               "error", r->detail[0] ? r->detail : NULL, LOG_F_STR, "terminated", end, LOG_F_END);
    }
    free(r->body);
    free(r);
}

/* MHD's own messages: into start_err while starting (a failed bind says why there), into
 * the log otherwise. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    srv_http *h = cls;
    char msg[256];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    pthread_mutex_lock(&h->mu);
    bool starting = h->starting;
    if (starting)
        snprintf(h->start_err, sizeof h->start_err, "%s", msg);
    pthread_mutex_unlock(&h->mu);
    /* While starting, srv_http_start's err carries it (the server logs that). */
    log_kv(starting ? LOG_DEBUG : LOG_WARN, "libmicrohttpd", LOG_F_STR, "error", msg, LOG_F_END);
}

/* ---- start and stop ---- */

/* "host:port", "[v6]:port" or ":port" (every interface) into host ("" = any) and port. */
static int split_listen(const char *s, char *host, size_t hostcap, char *port, size_t portcap)
{
    const char *colon;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (!close || close[1] != ':')
            return -1;
        if ((size_t)(close - s - 1) >= hostcap)
            return -1;
        memcpy(host, s + 1, (size_t)(close - s - 1));
        host[close - s - 1] = '\0';
        colon = close + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon || memchr(s, ':', (size_t)(colon - s)))
            return -1; /* no port, or an IPv6 literal without brackets */
        if ((size_t)(colon - s) >= hostcap)
            return -1;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = '\0';
    }
    const char *p = colon + 1;
    if (!*p || strlen(p) >= portcap || strspn(p, "0123456789") != strlen(p) || strlen(p) > 5 ||
        atoi(p) > 65535)
        return -1;
    snprintf(port, portcap, "%s", p);
    return 0;
}

/* Resolves http_listen into *addr (IPv4 preferred when a name has both). */
static int resolve_listen(const char *listen, struct sockaddr_storage *addr, socklen_t *alen,
                          char *err, size_t errlen)
{
    char host[256], port[8];
    if (split_listen(listen, host, sizeof host, port, sizeof port) != 0) {
        snprintf(err, errlen, "http.listen \"%s\": expected host:port (port 0..65535)", listen);
        return -1;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "http.listen \"%s\": cannot resolve \"%s\": %s", listen, host,
                 gai_strerror(rc));
        return -1;
    }
    const struct addrinfo *pick = NULL;
    for (const struct addrinfo *a = res; a; a = a->ai_next) {
        if (a->ai_family == AF_INET) {
            pick = a;
            break;
        }
        if (a->ai_family == AF_INET6 && !pick)
            pick = a;
    }
    if (!pick || pick->ai_addrlen > sizeof *addr) {
        freeaddrinfo(res);
        snprintf(err, errlen, "http.listen \"%s\": no IPv4 or IPv6 address", listen);
        return -1;
    }
    memcpy(addr, pick->ai_addr, pick->ai_addrlen);
    *alen = pick->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static void http_free(srv_http *h)
{
    if (!h)
        return;
    http_slot *t = h->slots;
    while (t) {
        http_slot *next = t->next;
        srv_bg_close(t->bg);
        free(t);
        t = next;
    }
    if (h->stripe_secret) {
        explicit_bzero(h->stripe_secret, strlen(h->stripe_secret));
        free(h->stripe_secret);
    }
    pthread_cond_destroy(&h->freed);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

int srv_http_start(srv_server *srv, char *err, size_t errlen)
{
    const srv_config *cfg = srv->cfg;
    srv->http = NULL;
    if (!cfg->http_listen[0]) {
        log_kv(LOG_INFO, "http side port off (http.listen is empty)", LOG_F_END);
        return 0;
    }
    struct sockaddr_storage addr;
    socklen_t alen = 0;
    if (resolve_listen(cfg->http_listen, &addr, &alen, err, errlen) != 0)
        return -1;

    srv_http *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    h->srv = srv;
    pthread_mutex_init(&h->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&h->freed, &ca);
    pthread_condattr_destroy(&ca);
    h->max_slots = cfg->http_threads > 0 ? (unsigned)cfg->http_threads : 1;
    if (cfg->stripe_webhook_secret) {
        if (memchr(cfg->stripe_webhook_secret, '\0', cfg->stripe_webhook_secret_len)) {
            snprintf(err, errlen, "payments.stripe.webhook_secret contains a NUL byte");
            http_free(h);
            return -1;
        }
        h->stripe_secret = malloc(cfg->stripe_webhook_secret_len + 1);
        if (!h->stripe_secret) {
            snprintf(err, errlen, "out of memory");
            http_free(h);
            return -1;
        }
        memcpy(h->stripe_secret, cfg->stripe_webhook_secret, cfg->stripe_webhook_secret_len);
        h->stripe_secret[cfg->stripe_webhook_secret_len] = '\0';
    }

    /* A thread per connection (see DESIGN); its listening thread polls with poll(). */
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_ERROR_LOG | MHD_USE_POLL;
    if (addr.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    h->starting = true;
    h->d = MHD_start_daemon(flags, 0, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER,
                            on_mhd_log, h, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTP_TIMEOUT_S,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)HTTP_MAX_CONNECTIONS,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HTTP_CONN_MEMORY,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, h, MHD_OPTION_END);
    pthread_mutex_lock(&h->mu);
    h->starting = false;
    pthread_mutex_unlock(&h->mu);
    if (!h->d) {
        /* MHD says "Failed to bind to port 0: <strerror>" when given an address (it only
         * knows the port it was passed separately): keep the reason, not the port. */
        const char *why = h->start_err[0] ? h->start_err : "libmicrohttpd refused";
        const char *colon = strrchr(why, ':');
        if (strncmp(why, "Failed to bind", 14) == 0 && colon && colon[1] == ' ')
            snprintf(err, errlen, "http.listen %s: cannot listen: %s", cfg->http_listen, colon + 2);
        else
            snprintf(err, errlen, "http.listen %s: cannot start the HTTP side port: %s",
                     cfg->http_listen, why);
        http_free(h);
        return -1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = info ? info->port : 0;
    srv->http = h;

    log_kv(LOG_INFO, "http side port listening", LOG_F_STR, "listen", cfg->http_listen, LOG_F_INT,
           "port", (int64_t)h->port, LOG_F_INT, "webhook_services", (int64_t)h->max_slots,
           LOG_F_STR, "stripe_webhooks", h->stripe_secret ? "on" : "off", LOG_F_STR,
           "paypal_webhooks",
           cfg->paypal_enabled ? (cfg->paypal_webhook_id[0] ? "on" : "unconfigured") : "off",
           LOG_F_END);
    if (cfg->stripe_enabled && !h->stripe_secret)
        log_kv(LOG_WARN,
               "Stripe is enabled but payments.stripe.webhook_secret is not set: Stripe "
               "webhooks are refused with 503",
               LOG_F_END);
    if (cfg->paypal_enabled && !cfg->paypal_webhook_id[0])
        log_kv(LOG_WARN,
               "PayPal is enabled but payments.paypal.webhook_id is not set: PayPal webhooks "
               "are refused with 503",
               LOG_F_END);
    return 0;
}

void srv_http_stop(srv_server *srv)
{
    srv_http *h = srv->http;
    if (!h)
        return;
    srv->http = NULL;
    /* Joins the pool's threads (a webhook in progress finishes first), so nobody uses a
     * thread's service any more when http_free closes them. */
    MHD_stop_daemon(h->d);
    http_free(h);
}

unsigned srv__http_port(const srv_server *srv)
{
    return srv->http ? srv->http->port : 0;
}
