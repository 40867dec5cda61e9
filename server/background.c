/* background.c — what runs beside the gRPC workers: the per-thread domain dependencies
 * (store, cache, payment providers, service) that workers and background threads build
 * alike, the background services (srv_bg) of the HTTP side port and the consumer, the
 * sweeper thread (expiry of unpaid orders, settlement of payments a failure left), and the
 * start and stop of the AMQP relay and consumer.
 *
 * DESIGN
 * Every thread that runs the domain owns its connections (ARCHITECTURE.md, Threads): no
 * locks on the request path. The sweeper wakes every orders.sweep_interval, expires what is
 * due in batches and retries settlements; any number of replicas may sweep at once (the
 * store claims rows with SKIP LOCKED and every change is a conditional update).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "amqp/amqp.h"
#include "cache/cache.h"
#include "common/clock.h"
#include "common/log.h"
#include "payments/payments.h"
#include "server/internal.h"
#include "storage/storage.h"

static const cache_codec order_codec = {srv_order_encode, srv_order_decode};

/* The domain's notices, as warnings in the log. */
static void log_notice(const char *what, const order_t *o, const order_error *e)
{
    log_kv(LOG_WARN, what, LOG_F_STR, "order_id", o ? o->id : NULL, LOG_F_STR, "status",
           o ? order_status_name(o->status) : NULL, LOG_F_STR, "payment_status",
           o ? order_pay_status_name(o->pay_status) : NULL, LOG_F_STR, "error",
           e && e->code ? e->message : NULL, LOG_F_END);
}

/* A secret kept with its length, as a C string (for libraries that want one). */
static char *secret_str(const unsigned char *p, size_t len)
{
    if (!p)
        return NULL;
    char *s = malloc(len + 1);
    if (s) {
        memcpy(s, p, len);
        s[len] = '\0';
    }
    return s;
}

static void secret_free(char *s)
{
    if (s) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

static pay_http_config http_config(const srv_config *cfg)
{
    return (pay_http_config){
        .timeout_us = cfg->pay_timeout_us,
        .connect_timeout_us = cfg->pay_connect_timeout_us,
        .max_attempts = cfg->pay_max_attempts,
        .backoff_base_us = cfg->pay_backoff_base_us,
        .backoff_max_us = cfg->pay_backoff_max_us,
        .ca_file = cfg->pay_ca_file[0] ? cfg->pay_ca_file : NULL,
    };
}

static int open_providers(srv_server *srv, srv_deps *d, char *err, size_t errlen)
{
    const srv_config *cfg = srv->cfg;
    bool production = strcmp(cfg->environment, "production") == 0;
    if (cfg->local_enabled && !production) {
        d->pay[ORDER_PROVIDER_LOCAL] = pay_local_create(d->store, cfg->environment, err, errlen);
        if (!d->pay[ORDER_PROVIDER_LOCAL])
            return -1;
    }
    if (cfg->stripe_enabled) {
        char *key = secret_str(cfg->stripe_secret_key, cfg->stripe_secret_key_len);
        pay_stripe_config sc = {
            .api_base = cfg->stripe_api_base,
            .secret_key = key ? key : "",
            .api_version = cfg->stripe_api_version,
            .environment = cfg->environment,
            .http = http_config(cfg),
        };
        d->pay[ORDER_PROVIDER_STRIPE] = pay_stripe_create(&sc, err, errlen);
        secret_free(key);
        if (!d->pay[ORDER_PROVIDER_STRIPE])
            return -1;
    }
    if (cfg->paypal_enabled) {
        char *secret = secret_str(cfg->paypal_client_secret, cfg->paypal_client_secret_len);
        pay_paypal_config pc = {
            .api_base = cfg->paypal_api_base,
            .client_id = cfg->paypal_client_id,
            .client_secret = secret ? secret : "",
            .return_url = cfg->paypal_return_url,
            .cancel_url = cfg->paypal_cancel_url,
            .brand_name = cfg->paypal_brand_name[0] ? cfg->paypal_brand_name : NULL,
            .http = http_config(cfg),
        };
        d->pay[ORDER_PROVIDER_PAYPAL] = pay_paypal_create(&pc, err, errlen);
        secret_free(secret);
        if (!d->pay[ORDER_PROVIDER_PAYPAL])
            return -1;
    }
    for (int p = 0; p <= ORDER_PROVIDER_MAX; p++)
        d->svc.providers[p] = d->pay[p];
    return 0;
}

int srv_deps_open(srv_server *srv, srv_deps *d, char *err, size_t errlen)
{
    const srv_config *cfg = srv->cfg;
    memset(d, 0, sizeof *d);
    d->store = store_open(cfg->pg_dsn, cfg->pg_statement_timeout_us, err, errlen);
    if (!d->store)
        return -1;
    d->svc.cfg.tax_rate_bps = cfg->tax_rate_bps;
    d->svc.cfg.max_total_minor = cfg->max_total_minor;
    d->svc.notice = log_notice;
    store_order_port(d->store, &d->store_port);
    d->svc.store = d->store_port;
    if (cfg->cache_enabled || cfg->ratelimit_enabled) {
        /* The password is kept with its length; hiredis wants a C string. */
        char password[512] = "";
        if (cfg->redis_password && cfg->redis_password_len < sizeof password) {
            memcpy(password, cfg->redis_password, cfg->redis_password_len);
            password[cfg->redis_password_len] = '\0';
        }
        cache_options co = {
            .host = cfg->redis_host,
            .port = cfg->redis_port,
            .database = cfg->redis_database,
            .password = password,
            .timeout_us = cfg->redis_timeout_us,
            .backoff_min_us = 100 * 1000,
            .backoff_max_us = cfg->redis_backoff_max_us,
            .key_prefix = cfg->cache_key_prefix,
            .order_ttl_us = cfg->cache_order_ttl_us,
            .tls = cfg->redis_tls,
            .tls_ca_file = cfg->redis_tls_ca_file,
            .tls_cert_file = cfg->redis_tls_cert_file,
            .tls_key_file = cfg->redis_tls_key_file,
            .tls_server_name = cfg->redis_tls_server_name,
        };
        d->cache = cache_open(&co, err, errlen);
        explicit_bzero(password, sizeof password);
        if (!d->cache) {
            srv_deps_close(d);
            return -1;
        }
        if (cfg->cache_enabled)
            cache_store_wrap(d->cache, &d->store_port, &order_codec, &d->svc.store);
    }
    if (open_providers(srv, d, err, errlen) != 0) {
        srv_deps_close(d);
        return -1;
    }
    return 0;
}

void srv_deps_close(srv_deps *d)
{
    pay_local_destroy(d->pay[ORDER_PROVIDER_LOCAL]);
    pay_stripe_destroy(d->pay[ORDER_PROVIDER_STRIPE]);
    pay_paypal_destroy(d->pay[ORDER_PROVIDER_PAYPAL]);
    cache_close(d->cache);
    store_close(d->store);
    memset(d, 0, sizeof *d);
}

/* ---- background services ---- */

struct srv_bg {
    srv_deps d;
    char actor[ORDER_CUSTOMER_MAX + 1];
};

srv_bg *srv_bg_open(srv_server *srv, const char *actor, char *err, size_t errlen)
{
    srv_bg *bg = calloc(1, sizeof *bg);
    if (!bg) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    snprintf(bg->actor, sizeof bg->actor, "%s", actor);
    if (srv_deps_open(srv, &bg->d, err, errlen) != 0) {
        free(bg);
        return NULL;
    }
    return bg;
}

void srv_bg_close(srv_bg *bg)
{
    if (!bg)
        return;
    srv_deps_close(&bg->d);
    free(bg);
}

order_service *srv_bg_service(srv_bg *bg)
{
    return &bg->d.svc;
}

order_ctx srv_bg_ctx(srv_bg *bg, order_error *err, int64_t timeout_us)
{
    memset(err, 0, sizeof *err);
    order_ctx ctx = {
        .caller.roles = ORDER_ROLE_SERVICE | ORDER_ROLE_ADMIN,
        .deadline_mono_us = timeout_us > 0 ? clock_mono_us() + timeout_us : INT64_MAX,
        .err = err,
    };
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "%s", bg->actor);
    return ctx;
}

order_payments *srv_bg_provider(srv_bg *bg, order_provider p)
{
    if ((int)p < 0 || (int)p > ORDER_PROVIDER_MAX)
        return NULL;
    return bg->d.pay[p];
}

/* ---- the sweeper ---- */

#define BG_CALL_TIMEOUT_US (30 * 1000000LL)

struct srv_sweeper {
    srv_server *srv;
    srv_bg *bg;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
};

static void sweep_once(struct srv_sweeper *sw)
{
    const srv_config *cfg = sw->srv->cfg;
    order_service *svc = srv_bg_service(sw->bg);
    order_error *err = malloc(sizeof *err);
    if (!err)
        return;
    size_t n = 0;
    /* Expire what is due, a batch at a time, while batches come back full. */
    for (int round = 0; round < 100; round++) {
        order_ctx ctx = srv_bg_ctx(sw->bg, err, BG_CALL_TIMEOUT_US);
        if (order_expire_due(svc, &ctx, cfg->pending_ttl_us, (size_t)cfg->sweep_batch, &n) !=
            ORDER_OK) {
            log_kv(LOG_WARN, "expiry sweep failed", LOG_F_STR, "error", err->message, LOG_F_END);
            break;
        }
        if (n)
            log_kv(LOG_INFO, "expired unpaid orders", LOG_F_INT, "count", (int64_t)n, LOG_F_END);
        if (n < (size_t)cfg->sweep_batch)
            break;
        pthread_mutex_lock(&sw->mu);
        bool stop = sw->stop;
        pthread_mutex_unlock(&sw->mu);
        if (stop)
            break;
    }
    order_ctx ctx = srv_bg_ctx(sw->bg, err, BG_CALL_TIMEOUT_US);
    if (order_settle_due(svc, &ctx, cfg->settle_after_us, (size_t)cfg->sweep_batch, &n) != ORDER_OK)
        log_kv(LOG_WARN, "settlement sweep failed", LOG_F_STR, "error", err->message, LOG_F_END);
    else if (n)
        log_kv(LOG_INFO, "settled payments left unsettled", LOG_F_INT, "count", (int64_t)n,
               LOG_F_END);
    free(err);
}

static void *sweeper_main(void *arg)
{
    struct srv_sweeper *sw = arg;
    for (;;) {
        sweep_once(sw);
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        int64_t ns = until.tv_nsec + (sw->srv->cfg->sweep_interval_us % 1000000) * 1000;
        until.tv_sec += sw->srv->cfg->sweep_interval_us / 1000000 + ns / 1000000000;
        until.tv_nsec = ns % 1000000000;
        pthread_mutex_lock(&sw->mu);
        while (!sw->stop && pthread_cond_timedwait(&sw->cv, &sw->mu, &until) == 0)
            ;
        bool stop = sw->stop;
        pthread_mutex_unlock(&sw->mu);
        if (stop)
            break;
    }
    return NULL;
}

static int sweeper_start(srv_server *srv, char *err, size_t errlen)
{
    struct srv_sweeper *sw = calloc(1, sizeof *sw);
    if (!sw) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    sw->srv = srv;
    sw->bg = srv_bg_open(srv, "system:sweeper", err, errlen);
    if (!sw->bg) {
        free(sw);
        return -1;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&sw->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&sw->mu, NULL);
    if (pthread_create(&sw->thread, NULL, sweeper_main, sw) != 0) {
        snprintf(err, errlen, "cannot start the sweeper thread");
        srv_bg_close(sw->bg);
        free(sw);
        return -1;
    }
    srv->sweeper = sw;
    return 0;
}

static void sweeper_stop(srv_server *srv)
{
    struct srv_sweeper *sw = srv->sweeper;
    if (!sw)
        return;
    pthread_mutex_lock(&sw->mu);
    sw->stop = true;
    pthread_cond_signal(&sw->cv);
    pthread_mutex_unlock(&sw->mu);
    pthread_join(sw->thread, NULL);
    pthread_cond_destroy(&sw->cv);
    pthread_mutex_destroy(&sw->mu);
    srv_bg_close(sw->bg);
    free(sw);
    srv->sweeper = NULL;
}

/* ---- AMQP: the relay and the inventory-reply consumer ---- */

static int on_stock_reply(void *arg, const order_stock_reply *r)
{
    srv_bg *bg = arg;
    order_error *err = malloc(sizeof *err);
    if (!err)
        return ORDER_EINTERNAL;
    order_ctx ctx = srv_bg_ctx(bg, err, BG_CALL_TIMEOUT_US);
    int rc = order_apply_stock_reply(srv_bg_service(bg), &ctx, r);
    /* INVALID_ARGUMENT without a field at fault is the database refusing a reply that
     * passed every check: not "ignore it" (the consumer acknowledges an unknown order),
     * but a failure to keep in the dead-letter queue. */
    if (rc == ORDER_EINVAL && err->nviolations == 0)
        rc = ORDER_EINTERNAL;
    log_level lvl = rc == ORDER_OK || rc == ORDER_EDUPLICATE ? LOG_INFO : LOG_WARN;
    log_kv(lvl, "inventory reply", LOG_F_STR, "event_id", r->id, LOG_F_STR, "type",
           r->rejected ? "stock.rejected" : "stock.reserved", LOG_F_STR, "order_id", r->order_id,
           LOG_F_STR, "result", order_code_name(rc), LOG_F_STR, "error",
           rc == ORDER_OK ? NULL : err->message, LOG_F_END);
    free(err);
    return rc;
}

static amqp_settings *amqp_settings_of(srv_server *srv)
{
    const srv_config *cfg = srv->cfg;
    amqp_settings *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    srv->amqp_password = secret_str(cfg->amqp_password, cfg->amqp_password_len);
    *s = (amqp_settings){
        .host = cfg->amqp_host,
        .port = cfg->amqp_port,
        .vhost = cfg->amqp_vhost,
        .user = cfg->amqp_user,
        .password = srv->amqp_password ? srv->amqp_password : "guest",
        .heartbeat_s = cfg->amqp_heartbeat_s,
        .timeout_us = cfg->amqp_timeout_us,
        .backoff_max_us = cfg->amqp_backoff_max_us,
        .tls = cfg->amqp_tls,
        .tls_ca_file = cfg->amqp_tls_ca_file,
        .tls_cert_file = cfg->amqp_tls_cert_file,
        .tls_key_file = cfg->amqp_tls_key_file,
        .tls_skip_verify = !cfg->amqp_tls_verify,
        .tls_server_name = cfg->amqp_tls_server_name,
        .exchange = cfg->amqp_exchange,
        .declare_queues = cfg->amqp_declare_queues,
        .stock_queue = cfg->amqp_stock_queue,
        .order_queue = cfg->amqp_order_queue,
        .quorum_queues = cfg->amqp_quorum_queues,
        .reply_queue = cfg->amqp_reply_queue,
        .reply_keys = cfg->amqp_reply_keys,
        .dead_letter_exchange = cfg->amqp_dead_letter_exchange,
        .dead_letter_queue = cfg->amqp_dead_letter_queue,
        .prefetch = cfg->amqp_prefetch,
        .reply_max_attempts = cfg->amqp_reply_max_attempts,
        .relay_batch = cfg->amqp_relay_batch,
        .relay_idle_poll_us = cfg->amqp_relay_idle_poll_us,
        .relay_claim_us = cfg->amqp_relay_claim_us,
        .relay_retry_max_us = cfg->amqp_relay_retry_max_us,
        .outbox_retention_us = cfg->outbox_retention_us,
        .stats_interval_us = cfg->outbox_stats_interval_us,
    };
    return s;
}

int srv_background_start(srv_server *srv, char *err, size_t errlen)
{
    const srv_config *cfg = srv->cfg;
    if (cfg->amqp_enabled) {
        amqp_settings *s = amqp_settings_of(srv);
        if (!s) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        srv->amqp_settings = s;
        /* Once per process, not per connection: every relay and the consumer share it. */
        if (s->tls && s->tls_skip_verify)
            log_kv(LOG_WARN,
                   "amqp.tls_verify is false: the broker's certificate and name are NOT "
                   "verified; anyone on the path can read and alter events (development only)",
                   LOG_F_STR, "host", s->host, LOG_F_INT, "port", (int64_t)s->port, LOG_F_STR,
                   "environment", cfg->environment, LOG_F_END);
        /* Several relays share the outbox like replicas do (SKIP LOCKED, chain heads): on a
         * busy database one connection gets one backend's share of it (bench/relay.sh). */
        int n = cfg->amqp_relays < 1 ? 1 : cfg->amqp_relays;
        if (n > (int)(sizeof srv->relays / sizeof srv->relays[0]))
            n = (int)(sizeof srv->relays / sizeof srv->relays[0]);
        for (int i = 0; i < n; i++) {
            if (amqp_relay_start(s, cfg->pg_dsn, cfg->pg_statement_timeout_us, &srv->relays[i], err,
                                 errlen) != 0)
                return -1;
            srv->nrelays = i + 1;
        }
        srv->relay = srv->relays[0];
        if (cfg->amqp_consume_replies) {
            srv->consumer_bg = srv_bg_open(srv, "system:inventory", err, errlen);
            if (!srv->consumer_bg)
                return -1;
            if (amqp_consumer_start(s, on_stock_reply, srv->consumer_bg, &srv->consumer, err,
                                    errlen) != 0)
                return -1;
        }
    }
    return sweeper_start(srv, err, errlen);
}

void srv_background_stop(srv_server *srv)
{
    sweeper_stop(srv);
    amqp_consumer_stop(srv->consumer);
    srv->consumer = NULL;
    srv_bg_close(srv->consumer_bg);
    srv->consumer_bg = NULL;
    for (int i = 0; i < srv->nrelays; i++) {
        amqp_relay_stop(srv->relays[i]);
        srv->relays[i] = NULL;
    }
    srv->nrelays = 0;
    srv->relay = NULL;
    free(srv->amqp_settings);
    srv->amqp_settings = NULL;
    secret_free(srv->amqp_password);
    srv->amqp_password = NULL;
}
