/* config.c — loads config.yaml, the ORDERD_* environment and the secrets; see config.h.
 *
 * DESIGN
 * One table, settings[], holds every setting: its YAML path, type, bounds, default and
 * the field of srv_config it fills (the shape of redis's static_configs[]). Defaults,
 * YAML scalars and environment values all go through the same parse_value(), so they
 * are checked alike and a default outside its own bounds trips an assert at the first
 * load. The YAML file is read with libyaml's document loader, which keeps a line number
 * on every node; settings live at the top level or in sections, which may nest
 * (payments.stripe.enabled).
 * Secrets are rows with SF_ENV_ONLY: they may come from their environment variable but
 * never from the YAML file; the file rows next to them name where else to look.
 * Anything that may hold a secret (SF_SECRET, SF_DSN) is never echoed in an error.
 */
#include "server/config.h"

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <yaml.h>

#include "common/clock.h"
#include "common/log.h"
#include "server/auth.h"

extern char **environ;

/* ---- the table -------------------------------------------------------------- */

typedef enum set_type {
    ST_STRING,   /* char[size]; longer is an error */
    ST_HEAPSTR,  /* char * on the heap */
    ST_PATH,     /* char[PATH_MAX]: a file path made absolute against cfg->dir; "" = none */
    ST_INT,      /* int32_t or int64_t (by size) within [min, max] */
    ST_DURATION, /* int64_t microseconds (clock_parse_duration) within [min, max] */
    ST_BOOL,     /* bool: true/false, yes/no, on/off */
    ST_ENUM,     /* char[size] holding one of choices[] */
    ST_LOGLEVEL, /* log_level */
    ST_ROLES,    /* unsigned ORDER_ROLE_* bits from comma-separated names; "" = none */
    ST_SECRET,   /* unsigned char * (heap) with its size_t length at len_offset */
} set_type;

enum {
    SF_SECRET = 1u,   /* the value is secret: never echoed, logged as (set)/(unset) */
    SF_ENV_ONLY = 2u, /* may not appear in the YAML file */
    SF_DSN = 4u,      /* a libpq DSN: never echoed, logged with its password masked */
};

typedef struct setting {
    const char *name; /* YAML path, "section.key" or "key" */
    set_type type;
    unsigned flags;
    const char *def; /* default, in the same syntax as the file; NULL = unset */
    size_t offset;   /* of the target field in srv_config */
    size_t size;     /* of the target field */
    size_t len_offset;
    int64_t min, max;
    const char *const *choices;
} setting;

#define FIELD(f) .offset = offsetof(srv_config, f), .size = sizeof(((srv_config *)0)->f)
#define US_MS    1000LL
#define US_S     1000000LL
#define US_M     (60 * US_S)
#define US_H     (60 * US_M)
#define US_D     (24 * US_H)

static const char *const environments[] = {"development", "production", NULL};

/* Keep docs/configuration.md and config.yaml in step with this table. One row per
 * setting: name, type, flags, default, target field, bounds. */
// clang-format off
static const setting settings[] = {
    {"environment", ST_ENUM, 0, "production", FIELD(environment), .choices = environments},

    {"server.listen", ST_STRING, 0, "127.0.0.1:50051", FIELD(listen)},
    {"server.workers", ST_INT, 0, "8", FIELD(workers), .min = 1, .max = 256},
    {"server.max_receive_message_bytes", ST_INT, 0, "4194304", FIELD(max_receive_message_bytes),
     .min = 1024, .max = 1 << 30},
    {"server.max_send_message_bytes", ST_INT, 0, "4194304", FIELD(max_send_message_bytes),
     .min = 1024, .max = 1 << 30},
    {"server.max_metadata_bytes", ST_INT, 0, "16384", FIELD(max_metadata_bytes),
     .min = 1024, .max = 1 << 20},
    {"server.shutdown_grace", ST_DURATION, 0, "10s", FIELD(shutdown_grace_us),
     .min = 0, .max = US_H},

    {"postgres.dsn", ST_HEAPSTR, SF_DSN, "", FIELD(pg_dsn), .max = 8192},
    {"postgres.statement_timeout", ST_DURATION, 0, "5s", FIELD(pg_statement_timeout_us),
     .min = US_MS, .max = US_H},

    {"auth.hs256_secret", ST_SECRET, SF_SECRET | SF_ENV_ONLY, NULL, FIELD(hs256_secret),
     .len_offset = offsetof(srv_config, hs256_secret_len)},
    {"auth.hs256_secret_file", ST_PATH, 0, "", FIELD(hs256_secret_file)},
    {"auth.rs256_public_key_file", ST_PATH, 0, "", FIELD(rs256_public_key_file)},
    {"auth.issuer", ST_STRING, 0, "", FIELD(issuer)},
    {"auth.audience", ST_STRING, 0, "", FIELD(audience)},
    {"auth.reflection_role", ST_ROLES, 0, "admin", FIELD(reflection_roles)},
    {"auth.token_ttl", ST_DURATION, 0, "15m", FIELD(token_ttl_us), .min = US_S, .max = 30 * US_D},

    {"orders.tax_rate_bps", ST_INT, 0, "0", FIELD(tax_rate_bps), .min = 0, .max = 10000},
    {"orders.max_total_minor", ST_INT, 0, "99999999", FIELD(max_total_minor),
     .min = 1, .max = INT64_MAX},
    {"orders.page_token_secret", ST_SECRET, SF_SECRET | SF_ENV_ONLY, NULL, FIELD(page_token_secret),
     .len_offset = offsetof(srv_config, page_token_secret_len)},
    {"orders.page_token_secret_file", ST_PATH, 0, "", FIELD(page_token_secret_file)},
    {"orders.pending_ttl", ST_DURATION, 0, "30m", FIELD(pending_ttl_us), .min = US_S, .max = 90 * US_D},
    {"orders.sweep_interval", ST_DURATION, 0, "10s", FIELD(sweep_interval_us),
     .min = 10 * US_MS, .max = US_H},
    {"orders.sweep_batch", ST_INT, 0, "100", FIELD(sweep_batch), .min = 1, .max = 10000},
    {"orders.settle_after", ST_DURATION, 0, "30s", FIELD(settle_after_us), .min = 0, .max = US_D},

    {"payments.local.enabled", ST_BOOL, 0, "false", FIELD(local_enabled)},
    {"payments.stripe.enabled", ST_BOOL, 0, "false", FIELD(stripe_enabled)},
    {"payments.stripe.api_base", ST_STRING, 0, "https://api.stripe.com", FIELD(stripe_api_base)},
    {"payments.stripe.api_version", ST_STRING, 0, "2024-06-20", FIELD(stripe_api_version)},
    {"payments.stripe.secret_key", ST_SECRET, SF_SECRET | SF_ENV_ONLY, NULL, FIELD(stripe_secret_key),
     .len_offset = offsetof(srv_config, stripe_secret_key_len)},
    {"payments.stripe.secret_key_file", ST_PATH, 0, "", FIELD(stripe_secret_key_file)},
    {"payments.stripe.webhook_secret", ST_SECRET, SF_SECRET | SF_ENV_ONLY, NULL,
     FIELD(stripe_webhook_secret), .len_offset = offsetof(srv_config, stripe_webhook_secret_len)},
    {"payments.stripe.webhook_secret_file", ST_PATH, 0, "", FIELD(stripe_webhook_secret_file)},
    {"payments.stripe.webhook_tolerance", ST_DURATION, 0, "300s", FIELD(stripe_webhook_tolerance_us),
     .min = US_S, .max = US_D},
    {"payments.paypal.enabled", ST_BOOL, 0, "false", FIELD(paypal_enabled)},
    {"payments.paypal.api_base", ST_STRING, 0, "https://api-m.paypal.com", FIELD(paypal_api_base)},
    {"payments.paypal.client_id", ST_STRING, 0, "", FIELD(paypal_client_id)},
    {"payments.paypal.client_secret", ST_SECRET, SF_SECRET | SF_ENV_ONLY, NULL,
     FIELD(paypal_client_secret), .len_offset = offsetof(srv_config, paypal_client_secret_len)},
    {"payments.paypal.client_secret_file", ST_PATH, 0, "", FIELD(paypal_client_secret_file)},
    {"payments.paypal.webhook_id", ST_STRING, 0, "", FIELD(paypal_webhook_id)},
    {"payments.paypal.return_url", ST_STRING, 0, "https://shop.example.com/checkout/return",
     FIELD(paypal_return_url)},
    {"payments.paypal.cancel_url", ST_STRING, 0, "https://shop.example.com/checkout/cancel",
     FIELD(paypal_cancel_url)},
    {"payments.paypal.brand_name", ST_STRING, 0, "", FIELD(paypal_brand_name)},
    {"payments.timeout", ST_DURATION, 0, "10s", FIELD(pay_timeout_us), .min = 10 * US_MS, .max = US_M},
    {"payments.connect_timeout", ST_DURATION, 0, "3s", FIELD(pay_connect_timeout_us),
     .min = 10 * US_MS, .max = US_M},
    {"payments.max_attempts", ST_INT, 0, "3", FIELD(pay_max_attempts), .min = 1, .max = 10},
    {"payments.backoff_base", ST_DURATION, 0, "500ms", FIELD(pay_backoff_base_us),
     .min = US_MS, .max = US_M},
    {"payments.backoff_max", ST_DURATION, 0, "5s", FIELD(pay_backoff_max_us),
     .min = US_MS, .max = 5 * US_M},
    {"payments.ca_file", ST_PATH, 0, "", FIELD(pay_ca_file)},

    {"http.listen", ST_STRING, 0, "127.0.0.1:58080", FIELD(http_listen)},
    {"http.threads", ST_INT, 0, "2", FIELD(http_threads), .min = 1, .max = 64},
    {"http.max_body_bytes", ST_INT, 0, "1048576", FIELD(http_max_body_bytes),
     .min = 1024, .max = 64 << 20},

    {"amqp.enabled", ST_BOOL, 0, "true", FIELD(amqp_enabled)},
    {"amqp.host", ST_STRING, 0, "127.0.0.1", FIELD(amqp_host)},
    {"amqp.port", ST_INT, 0, "5672", FIELD(amqp_port), .min = 1, .max = 65535},
    {"amqp.vhost", ST_STRING, 0, "/", FIELD(amqp_vhost)},
    {"amqp.user", ST_STRING, 0, "guest", FIELD(amqp_user)},
    {"amqp.password", ST_SECRET, SF_SECRET | SF_ENV_ONLY, NULL, FIELD(amqp_password),
     .len_offset = offsetof(srv_config, amqp_password_len)},
    {"amqp.password_file", ST_PATH, 0, "", FIELD(amqp_password_file)},
    {"amqp.tls", ST_BOOL, 0, "false", FIELD(amqp_tls)},
    {"amqp.tls_ca_file", ST_PATH, 0, "", FIELD(amqp_tls_ca_file)},
    {"amqp.tls_cert_file", ST_PATH, 0, "", FIELD(amqp_tls_cert_file)},
    {"amqp.tls_key_file", ST_PATH, 0, "", FIELD(amqp_tls_key_file)},
    {"amqp.tls_verify", ST_BOOL, 0, "true", FIELD(amqp_tls_verify)},
    {"amqp.tls_server_name", ST_STRING, 0, "", FIELD(amqp_tls_server_name)},
    {"amqp.heartbeat", ST_INT, 0, "30", FIELD(amqp_heartbeat_s), .min = 0, .max = 3600},
    {"amqp.timeout", ST_DURATION, 0, "5s", FIELD(amqp_timeout_us), .min = 10 * US_MS, .max = US_M},
    {"amqp.reconnect_backoff_max", ST_DURATION, 0, "5s", FIELD(amqp_backoff_max_us),
     .min = 10 * US_MS, .max = 5 * US_M},
    {"amqp.exchange", ST_STRING, 0, "orderd.events", FIELD(amqp_exchange)},
    {"amqp.declare_queues", ST_BOOL, 0, "true", FIELD(amqp_declare_queues)},
    {"amqp.stock_queue", ST_STRING, 0, "inventory.stock", FIELD(amqp_stock_queue)},
    {"amqp.order_queue", ST_STRING, 0, "notifications.orders", FIELD(amqp_order_queue)},
    {"amqp.quorum_queues", ST_BOOL, 0, "false", FIELD(amqp_quorum_queues)},
    {"amqp.consume_replies", ST_BOOL, 0, "true", FIELD(amqp_consume_replies)},
    {"amqp.reply_queue", ST_STRING, 0, "orderd.inventory-replies", FIELD(amqp_reply_queue)},
    {"amqp.reply_keys", ST_STRING, 0, "stock.reserved,stock.rejected", FIELD(amqp_reply_keys)},
    {"amqp.dead_letter_exchange", ST_STRING, 0, "orderd.dead-letter", FIELD(amqp_dead_letter_exchange)},
    {"amqp.dead_letter_queue", ST_STRING, 0, "orderd.dead-letter", FIELD(amqp_dead_letter_queue)},
    {"amqp.prefetch", ST_INT, 0, "16", FIELD(amqp_prefetch), .min = 1, .max = 65535},
    {"amqp.reply_max_attempts", ST_INT, 0, "10", FIELD(amqp_reply_max_attempts), .min = 1,
     .max = 1000000},
    {"amqp.relays", ST_INT, 0, "2", FIELD(amqp_relays), .min = 1, .max = 16},
    {"amqp.relay_batch", ST_INT, 0, "100", FIELD(amqp_relay_batch), .min = 1, .max = 10000},
    {"amqp.relay_idle_poll", ST_DURATION, 0, "1s", FIELD(amqp_relay_idle_poll_us),
     .min = US_MS, .max = US_M},
    {"amqp.relay_claim", ST_DURATION, 0, "30s", FIELD(amqp_relay_claim_us), .min = US_S, .max = US_H},
    {"amqp.relay_retry_max", ST_DURATION, 0, "30s", FIELD(amqp_relay_retry_max_us),
     .min = 10 * US_MS, .max = US_H},
    {"amqp.outbox_retention", ST_DURATION, 0, "7d", FIELD(outbox_retention_us),
     .min = US_M, .max = 365 * US_D},
    {"amqp.stats_interval", ST_DURATION, 0, "10s", FIELD(outbox_stats_interval_us),
     .min = 100 * US_MS, .max = US_H},

    {"log.level", ST_LOGLEVEL, 0, "info", FIELD(log_level)},

    {"redis.host", ST_STRING, 0, "127.0.0.1", FIELD(redis_host)},
    {"redis.port", ST_INT, 0, "6379", FIELD(redis_port), .min = 1, .max = 65535},
    {"redis.database", ST_INT, 0, "0", FIELD(redis_database), .min = 0, .max = 1023},
    {"redis.password", ST_SECRET, SF_SECRET | SF_ENV_ONLY, NULL, FIELD(redis_password),
     .len_offset = offsetof(srv_config, redis_password_len)},
    {"redis.password_file", ST_PATH, 0, "", FIELD(redis_password_file)},
    {"redis.tls", ST_BOOL, 0, "false", FIELD(redis_tls)},
    {"redis.tls_ca_file", ST_PATH, 0, "", FIELD(redis_tls_ca_file)},
    {"redis.tls_cert_file", ST_PATH, 0, "", FIELD(redis_tls_cert_file)},
    {"redis.tls_key_file", ST_PATH, 0, "", FIELD(redis_tls_key_file)},
    {"redis.tls_server_name", ST_STRING, 0, "", FIELD(redis_tls_server_name)},
    {"redis.timeout", ST_DURATION, 0, "5ms", FIELD(redis_timeout_us), .min = 100, .max = 10 * US_S},
    {"redis.reconnect_backoff_max", ST_DURATION, 0, "2s", FIELD(redis_backoff_max_us),
     .min = 10 * US_MS, .max = 5 * US_M},

    {"cache.enabled", ST_BOOL, 0, "true", FIELD(cache_enabled)},
    {"cache.order_ttl", ST_DURATION, 0, "5m", FIELD(cache_order_ttl_us), .min = US_S, .max = 7 * US_D},
    {"cache.key_prefix", ST_STRING, 0, "orderd:", FIELD(cache_key_prefix)},

    {"ratelimit.enabled", ST_BOOL, 0, "true", FIELD(ratelimit_enabled)},
    {"ratelimit.replicas", ST_INT, 0, "1", FIELD(ratelimit_replicas), .min = 1, .max = 10000},
    {"ratelimit.customer", ST_STRING, 0, "20/40", FIELD(ratelimit_customer)},
    {"ratelimit.service", ST_STRING, 0, "1000/2000", FIELD(ratelimit_service)},
    {"ratelimit.admin", ST_STRING, 0, "100/200", FIELD(ratelimit_admin)},
    {"ratelimit.overrides", ST_STRING, 0, "", FIELD(ratelimit_overrides)},
};
// clang-format on
#define NSETTINGS (sizeof settings / sizeof settings[0])

/* The largest secret or key file read. */
#define SECRET_FILE_MAX (64 * 1024)

static const setting *find_setting(const char *name)
{
    for (size_t i = 0; i < NSETTINGS; i++)
        if (strcmp(settings[i].name, name) == 0)
            return &settings[i];
    return NULL;
}

/* True if `name` is a section: some setting is named "name.<key>". */
static bool is_section(const char *name, size_t len)
{
    for (size_t i = 0; i < NSETTINGS; i++)
        if (strncmp(settings[i].name, name, len) == 0 && settings[i].name[len] == '.')
            return true;
    return false;
}

/* ---- small helpers ---------------------------------------------------------- */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void *field(srv_config *cfg, size_t off)
{
    return (char *)cfg + off;
}

static const void *cfield(const srv_config *cfg, size_t off)
{
    return (const char *)cfg + off;
}

/* A value as shown in an error message: quoted, printable, at most ~60 bytes, or
 * "(hidden)" for anything that may be secret. */
static const char *shown(const setting *s, const char *v, char *buf, size_t cap)
{
    if (s->flags & (SF_SECRET | SF_DSN))
        return "(hidden)";
    size_t n = 0;
    buf[n++] = '"';
    for (const unsigned char *p = (const unsigned char *)v; *p && n + 5 < cap; p++) {
        if (n > 60) {
            memcpy(buf + n, "...", 3);
            n += 3;
            break;
        }
        buf[n++] = (*p >= 0x20 && *p < 0x7f) ? (char)*p : '?';
    }
    buf[n++] = '"';
    buf[n] = '\0';
    return buf;
}

/* "1h", "250ms", "0s": the largest unit that divides exactly. */
static void fmt_duration(int64_t us, char *buf, size_t cap)
{
    static const struct {
        int64_t us;
        const char *unit;
    } units[] = {{US_D, "d"}, {US_H, "h"}, {US_M, "m"}, {US_S, "s"}, {US_MS, "ms"}, {1, "us"}};
    if (us == 0) {
        snprintf(buf, cap, "0s");
        return;
    }
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (us % units[i].us == 0) {
            snprintf(buf, cap, "%lld%s", (long long)(us / units[i].us), units[i].unit);
            return;
        }
    }
}

static bool parse_i64(const char *v, int64_t *out)
{
    if (!*v || isspace((unsigned char)*v))
        return false;
    errno = 0;
    char *end;
    long long n = strtoll(v, &end, 10);
    if (errno || end == v || *end)
        return false;
    *out = n;
    return true;
}

static void wipe_free(void *p, size_t n)
{
    if (p) {
        OPENSSL_cleanse(p, n);
        free(p);
    }
}

/* Makes `v` absolute against `dir` into out[PATH_MAX]; "" stays "". */
static bool resolve_path(const char *dir, const char *v, char *out, size_t cap)
{
    int n;
    if (!*v || v[0] == '/')
        n = snprintf(out, cap, "%s", v);
    else
        n = snprintf(out, cap, "%s/%s", strcmp(dir, "/") == 0 ? "" : dir, v);
    return n >= 0 && (size_t)n < cap;
}

/* ---- one value ------------------------------------------------------------- */

/*
 * Parses `v` for setting `s` into cfg. `where` prefixes an error: "file:line" or the
 * environment variable's name. Returns 0, or -1 with err set.
 */
static int parse_value(const setting *s, const char *v, const char *where, srv_config *cfg,
                       char *err, size_t errlen)
{
    char show[80], a[32], b[32];
    void *dst = field(cfg, s->offset);

    switch (s->type) {
    case ST_STRING:
    case ST_ENUM:
        if (s->type == ST_ENUM) {
            size_t i;
            for (i = 0; s->choices[i]; i++)
                if (strcmp(v, s->choices[i]) == 0)
                    break;
            if (!s->choices[i]) {
                char list[128] = "";
                for (size_t j = 0; s->choices[j]; j++) {
                    strncat(list, j ? ", " : "", sizeof list - strlen(list) - 1);
                    strncat(list, s->choices[j], sizeof list - strlen(list) - 1);
                }
                set_err(err, errlen, "%s: %s: %s is not one of: %s", where, s->name,
                        shown(s, v, show, sizeof show), list);
                return -1;
            }
        }
        if (strlen(v) >= s->size) {
            set_err(err, errlen, "%s: %s: value is too long (at most %zu bytes)", where, s->name,
                    s->size - 1);
            return -1;
        }
        memcpy(dst, v, strlen(v) + 1);
        return 0;

    case ST_HEAPSTR: {
        if (s->max > 0 && strlen(v) > (size_t)s->max) {
            set_err(err, errlen, "%s: %s: value is too long (at most %lld bytes)", where, s->name,
                    (long long)s->max);
            return -1;
        }
        char *copy = strdup(v);
        if (!copy) {
            set_err(err, errlen, "%s: %s: out of memory", where, s->name);
            return -1;
        }
        char **p = dst;
        if (*p)
            wipe_free(*p, strlen(*p));
        *p = copy;
        return 0;
    }

    case ST_PATH:
        if (!resolve_path(cfg->dir, v, dst, s->size)) {
            set_err(err, errlen, "%s: %s: path is too long", where, s->name);
            return -1;
        }
        return 0;

    case ST_INT: {
        int64_t n;
        if (!parse_i64(v, &n) || n < s->min || n > s->max) {
            set_err(err, errlen, "%s: %s: %s is %s (allowed %lld..%lld)", where, s->name,
                    shown(s, v, show, sizeof show),
                    parse_i64(v, &n) ? "out of range" : "not an integer", (long long)s->min,
                    (long long)s->max);
            return -1;
        }
        if (s->size == sizeof(int32_t))
            *(int32_t *)dst = (int32_t)n;
        else
            *(int64_t *)dst = n;
        return 0;
    }

    case ST_DURATION: {
        int64_t us;
        bool ok = clock_parse_duration(v, &us) == 0;
        if (!ok || us < s->min || us > s->max) {
            fmt_duration(s->min, a, sizeof a);
            fmt_duration(s->max, b, sizeof b);
            set_err(err, errlen, "%s: %s: %s is %s (allowed %s..%s; units us, ms, s, m, h, d)",
                    where, s->name, shown(s, v, show, sizeof show),
                    ok ? "out of range" : "not a duration", a, b);
            return -1;
        }
        *(int64_t *)dst = us;
        return 0;
    }

    case ST_BOOL: {
        static const char *const yes[] = {"true", "yes", "on", "1"};
        static const char *const no[] = {"false", "no", "off", "0"};
        for (size_t i = 0; i < 4; i++) {
            if (strcasecmp(v, yes[i]) == 0 || strcasecmp(v, no[i]) == 0) {
                *(bool *)dst = strcasecmp(v, yes[i]) == 0;
                return 0;
            }
        }
        set_err(err, errlen, "%s: %s: %s is not a boolean (true or false)", where, s->name,
                shown(s, v, show, sizeof show));
        return -1;
    }

    case ST_LOGLEVEL: {
        log_level lvl;
        if (!log_level_parse(v, &lvl)) {
            set_err(err, errlen, "%s: %s: %s is not one of: debug, info, warn, error", where,
                    s->name, shown(s, v, show, sizeof show));
            return -1;
        }
        *(log_level *)dst = lvl;
        return 0;
    }

    case ST_ROLES: {
        unsigned roles = *v ? srv_roles_parse(v) : 0;
        if (*v && !roles) {
            set_err(err, errlen,
                    "%s: %s: %s is not a comma-separated list of roles (customer, service, "
                    "admin), or empty for none",
                    where, s->name, shown(s, v, show, sizeof show));
            return -1;
        }
        *(unsigned *)dst = roles;
        return 0;
    }

    case ST_SECRET: {
        /* An empty variable counts as unset: the file named next to it is used. */
        if (!*v)
            return 0;
        size_t n = strlen(v);
        unsigned char *copy = malloc(n);
        if (!copy) {
            set_err(err, errlen, "%s: %s: out of memory", where, s->name);
            return -1;
        }
        memcpy(copy, v, n);
        unsigned char **p = dst;
        size_t *len = field(cfg, s->len_offset);
        wipe_free(*p, *len);
        *p = copy;
        *len = n;
        return 0;
    }
    }
    assert(!"unknown setting type");
    return -1;
}

/* ---- the YAML file --------------------------------------------------------- */

/* The text of a scalar node, with YAML's plain nulls (~, null, empty) as "". NULL if the
 * node is not a scalar. *has_nul is set when the text holds a NUL byte. */
static const char *scalar_text(yaml_node_t *n, bool *has_nul)
{
    if (!n || n->type != YAML_SCALAR_NODE)
        return NULL;
    const char *t = (const char *)n->data.scalar.value;
    *has_nul = strlen(t) != n->data.scalar.length;
    if (n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
        (strcmp(t, "~") == 0 || strcmp(t, "null") == 0 || strcmp(t, "Null") == 0 ||
         strcmp(t, "NULL") == 0))
        return "";
    return t;
}

static int line_of(const yaml_node_t *n)
{
    return (int)n->start_mark.line + 1;
}

typedef struct yaml_walk {
    const char *path;
    srv_config *cfg;
    yaml_document_t *doc;
    int seen_line[NSETTINGS]; /* 0 = not yet set by the file */
    char *err;
    size_t errlen;
} yaml_walk;

/* Applies one `name: value` pair found in the file. */
static int apply_pair(yaml_walk *w, const char *name, yaml_node_t *key, yaml_node_t *val)
{
    const setting *s = find_setting(name);
    if (!s) {
        set_err(w->err, w->errlen, "%s:%d: unknown setting \"%s\"", w->path, line_of(key), name);
        return -1;
    }
    size_t idx = (size_t)(s - settings);
    if (w->seen_line[idx]) {
        set_err(w->err, w->errlen, "%s:%d: %s is set twice (first at line %d)", w->path,
                line_of(key), name, w->seen_line[idx]);
        return -1;
    }
    w->seen_line[idx] = line_of(key);
    if (s->flags & SF_ENV_ONLY) {
        char env[128];
        srv_config_env_name(s->name, env, sizeof env);
        set_err(w->err, w->errlen,
                "%s:%d: %s may not be written in the config file: set %s, or name a file "
                "with %s_file",
                w->path, line_of(key), name, env, name);
        return -1;
    }
    bool has_nul = false;
    const char *v = scalar_text(val, &has_nul);
    if (!v) {
        set_err(w->err, w->errlen, "%s:%d: %s: expected a single value, not a %s", w->path,
                line_of(val), name, val->type == YAML_MAPPING_NODE ? "mapping" : "list");
        return -1;
    }
    if (has_nul) {
        set_err(w->err, w->errlen, "%s:%d: %s: value contains a NUL byte", w->path, line_of(val),
                name);
        return -1;
    }
    char where[PATH_MAX + 32];
    snprintf(where, sizeof where, "%s:%d", w->path, line_of(val));
    return parse_value(s, v, where, w->cfg, w->err, w->errlen);
}

static int walk_section(yaml_walk *w, const char *section, yaml_node_t *map)
{
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = yaml_document_get_node(w->doc, p->key);
        yaml_node_t *v = yaml_document_get_node(w->doc, p->value);
        bool nul = false;
        const char *kt = scalar_text(k, &nul);
        if (!kt || nul || !*kt) {
            set_err(w->err, w->errlen, "%s:%d: a key in section %s is not a plain name", w->path,
                    k ? line_of(k) : 0, section);
            return -1;
        }
        char name[256];
        if ((size_t)snprintf(name, sizeof name, "%s.%s", section, kt) >= sizeof name) {
            set_err(w->err, w->errlen, "%s:%d: unknown setting in section %s", w->path, line_of(k),
                    section);
            return -1;
        }
        /* A nested section ("payments.stripe"): recurse. */
        if (is_section(name, strlen(name)) && !find_setting(name)) {
            if (v && v->type == YAML_MAPPING_NODE) {
                if (walk_section(w, name, v) != 0)
                    return -1;
                continue;
            }
            bool vnul = false;
            const char *vt = scalar_text(v, &vnul);
            if (vt && !*vt)
                continue; /* "stripe:" with nothing under it */
            set_err(w->err, w->errlen, "%s:%d: %s: expected a mapping of settings", w->path,
                    v ? line_of(v) : line_of(k), name);
            return -1;
        }
        if (apply_pair(w, name, k, v) != 0)
            return -1;
    }
    return 0;
}

static int walk_root(yaml_walk *w, yaml_node_t *root)
{
    if (root->type != YAML_MAPPING_NODE) {
        set_err(w->err, w->errlen, "%s:%d: expected a mapping of settings at the top level",
                w->path, line_of(root));
        return -1;
    }
    /* Sections met so far, to refuse a section written twice. */
    const char *sections[16];
    size_t nsections = 0;

    for (yaml_node_pair_t *p = root->data.mapping.pairs.start; p < root->data.mapping.pairs.top;
         p++) {
        yaml_node_t *k = yaml_document_get_node(w->doc, p->key);
        yaml_node_t *v = yaml_document_get_node(w->doc, p->value);
        bool nul = false;
        const char *kt = scalar_text(k, &nul);
        if (!kt || nul || !*kt) {
            set_err(w->err, w->errlen, "%s:%d: a top-level key is not a plain name", w->path,
                    k ? line_of(k) : 0);
            return -1;
        }
        if (strchr(kt, '.')) { /* "server.listen:" at the top would bypass the sections */
            set_err(w->err, w->errlen, "%s:%d: unknown setting \"%s\"", w->path, line_of(k), kt);
            return -1;
        }
        if (!is_section(kt, strlen(kt))) {
            if (!find_setting(kt) && v && v->type == YAML_MAPPING_NODE) {
                set_err(w->err, w->errlen, "%s:%d: unknown section \"%s\"", w->path, line_of(k),
                        kt);
                return -1;
            }
            if (apply_pair(w, kt, k, v) != 0)
                return -1;
            continue;
        }
        for (size_t i = 0; i < nsections; i++) {
            if (strcmp(sections[i], kt) == 0) {
                set_err(w->err, w->errlen, "%s:%d: section %s is written twice", w->path,
                        line_of(k), kt);
                return -1;
            }
        }
        if (nsections < sizeof sections / sizeof sections[0])
            sections[nsections++] = kt;
        bool vnul = false;
        const char *vt = scalar_text(v, &vnul);
        if (vt && !*vt)
            continue; /* "log:" with nothing under it */
        if (!v || v->type != YAML_MAPPING_NODE) {
            set_err(w->err, w->errlen, "%s:%d: %s: expected a mapping of settings", w->path,
                    v ? line_of(v) : line_of(k), kt);
            return -1;
        }
        if (walk_section(w, kt, v) != 0)
            return -1;
    }
    return 0;
}

static void yaml_problem(const yaml_parser_t *p, const char *path, char *err, size_t errlen)
{
    set_err(err, errlen, "%s:%zu: invalid YAML: %s%s%s", path, p->problem_mark.line + 1,
            p->problem ? p->problem : "syntax error", p->context ? " " : "",
            p->context ? p->context : "");
}

static int load_yaml(const char *path, srv_config *cfg, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        set_err(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    yaml_parser_t parser;
    yaml_document_t doc;
    int rc = -1;
    bool have_doc = false;
    if (!yaml_parser_initialize(&parser)) {
        fclose(f);
        set_err(err, errlen, "%s: out of memory", path);
        return -1;
    }
    yaml_parser_set_input_file(&parser, f);
    if (!yaml_parser_load(&parser, &doc)) {
        yaml_problem(&parser, path, err, errlen);
        goto done;
    }
    have_doc = true;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root) {
        yaml_walk w = {.path = path, .cfg = cfg, .doc = &doc, .err = err, .errlen = errlen};
        if (walk_root(&w, root) != 0)
            goto done;
        /* A second document would be silently ignored: refuse it. */
        yaml_document_t next;
        if (!yaml_parser_load(&parser, &next)) {
            yaml_problem(&parser, path, err, errlen);
            goto done;
        }
        bool more = yaml_document_get_root_node(&next) != NULL;
        int line = more ? line_of(yaml_document_get_root_node(&next)) : 0;
        yaml_document_delete(&next);
        if (more) {
            set_err(err, errlen, "%s:%d: only one YAML document is allowed", path, line);
            goto done;
        }
    }
    rc = 0;
done:
    if (have_doc)
        yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    fclose(f);
    return rc;
}

/* ---- environment and secrets ----------------------------------------------- */

static int load_env(srv_config *cfg, char *err, size_t errlen)
{
    for (size_t i = 0; i < NSETTINGS; i++) {
        char name[128];
        srv_config_env_name(settings[i].name, name, sizeof name);
        const char *v = getenv(name);
        if (v && parse_value(&settings[i], v, name, cfg, err, errlen) != 0)
            return -1;
    }
    /* A misspelt override would otherwise be ignored in silence. Only names under a
     * section's prefix are checked: other ORDERD_* variables belong to scripts. */
    for (char **e = environ; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (strncmp(*e, "ORDERD_", 7) != 0 || !eq)
            continue;
        size_t n = (size_t)(eq - *e);
        bool known = false, under_section = false;
        for (size_t i = 0; i < NSETTINGS && !known; i++) {
            char name[128], prefix[128];
            srv_config_env_name(settings[i].name, name, sizeof name);
            known = strlen(name) == n && strncmp(name, *e, n) == 0;
            const char *dot = strchr(settings[i].name, '.');
            if (dot) {
                snprintf(prefix, sizeof prefix, "%.*s_", (int)(dot - settings[i].name),
                         settings[i].name);
                char up[128];
                srv_config_env_name(prefix, up, sizeof up);
                under_section = under_section || strncmp(*e, up, strlen(up)) == 0;
            }
        }
        if (!known && under_section)
            LOG_WARNF("config: ignoring unknown environment variable %.*s", (int)n, *e);
    }
    return 0;
}

/* Reads a whole regular file of at most SECRET_FILE_MAX bytes into a NUL-terminated
 * heap buffer. Returns 0, or an errno value. */
static int read_small_file(const char *path, char **out, size_t *outlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return e;
    }
    if (!S_ISREG(st.st_mode) || st.st_size > SECRET_FILE_MAX) {
        close(fd);
        return !S_ISREG(st.st_mode) ? EINVAL : EFBIG;
    }
    size_t cap = (size_t)st.st_size + 1, len = 0;
    char *buf = malloc(cap);
    if (!buf) {
        close(fd);
        return ENOMEM;
    }
    while (len < cap - 1) {
        ssize_t r = read(fd, buf + len, cap - 1 - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            wipe_free(buf, cap);
            close(fd);
            return e;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = '\0';
    *out = buf;
    *outlen = len;
    return 0;
}

/*
 * Fills a secret from the file `file` (setting `file_setting`) unless the environment
 * already did. A file that cannot be read is an error only with SRV_CONFIG_NEED_SECRETS.
 */
static int load_secret_file(const char *file_setting, const char *file, unsigned char **dst,
                            size_t *dstlen, unsigned flags, char *err, size_t errlen)
{
    if (*dst || !*file)
        return 0;
    char *buf;
    size_t len;
    int e = read_small_file(file, &buf, &len);
    if (e) {
        if (flags & SRV_CONFIG_NEED_SECRETS) {
            set_err(err, errlen, "%s: cannot read %s: %s", file_setting, file,
                    e == EFBIG    ? "larger than 64 KiB"
                    : e == EINVAL ? "not a regular file"
                                  : strerror(e));
            return -1;
        }
        LOG_DEBUGF("config: %s: %s not read: %s", file_setting, file, strerror(e));
        return 0;
    }
    size_t full = len;
    while (len > 0 && isspace((unsigned char)buf[len - 1]))
        len--;
    if (len == 0) {
        wipe_free(buf, full);
        if (flags & SRV_CONFIG_NEED_SECRETS) {
            set_err(err, errlen, "%s: %s is empty", file_setting, file);
            return -1;
        }
        return 0;
    }
    OPENSSL_cleanse(buf + len, full - len);
    *dst = (unsigned char *)buf;
    *dstlen = len;
    return 0;
}

static int check_secret_len(const srv_config *cfg, const char *name, size_t len, char *err,
                            size_t errlen)
{
    if (len == 0 || len >= SRV_CONFIG_MIN_SECRET_LEN)
        return 0;
    char env[128];
    srv_config_env_name(name, env, sizeof env);
    if (strcmp(cfg->environment, "production") == 0) {
        set_err(err, errlen,
                "%s is %zu bytes long; production needs at least %d (set %s or %s_file)", name, len,
                SRV_CONFIG_MIN_SECRET_LEN, env, name);
        return -1;
    }
    LOG_WARNF("config: %s is only %zu bytes long; production will refuse fewer than %d", name, len,
              SRV_CONFIG_MIN_SECRET_LEN);
    return 0;
}

static int load_secrets(srv_config *cfg, unsigned flags, char *err, size_t errlen)
{
    bool need = flags & SRV_CONFIG_NEED_SECRETS;
    if (load_secret_file("auth.hs256_secret_file", cfg->hs256_secret_file, &cfg->hs256_secret,
                         &cfg->hs256_secret_len, flags, err, errlen) != 0)
        return -1;
    if (load_secret_file("orders.page_token_secret_file", cfg->page_token_secret_file,
                         &cfg->page_token_secret, &cfg->page_token_secret_len, flags, err,
                         errlen) != 0)
        return -1;
    if (load_secret_file("redis.password_file", cfg->redis_password_file, &cfg->redis_password,
                         &cfg->redis_password_len, flags, err, errlen) != 0)
        return -1;
    if (load_secret_file("payments.stripe.secret_key_file", cfg->stripe_secret_key_file,
                         &cfg->stripe_secret_key, &cfg->stripe_secret_key_len, flags, err,
                         errlen) != 0 ||
        load_secret_file("payments.stripe.webhook_secret_file", cfg->stripe_webhook_secret_file,
                         &cfg->stripe_webhook_secret, &cfg->stripe_webhook_secret_len, flags, err,
                         errlen) != 0 ||
        load_secret_file("payments.paypal.client_secret_file", cfg->paypal_client_secret_file,
                         &cfg->paypal_client_secret, &cfg->paypal_client_secret_len, flags, err,
                         errlen) != 0 ||
        load_secret_file("amqp.password_file", cfg->amqp_password_file, &cfg->amqp_password,
                         &cfg->amqp_password_len, flags, err, errlen) != 0)
        return -1;
    if (need && cfg->stripe_enabled && !cfg->stripe_secret_key) {
        set_err(err, errlen,
                "payments.stripe.enabled needs a key: set ORDERD_PAYMENTS_STRIPE_SECRET_KEY or "
                "payments.stripe.secret_key_file");
        return -1;
    }
    if (need && cfg->paypal_enabled && (!cfg->paypal_client_secret || !cfg->paypal_client_id[0])) {
        set_err(err, errlen,
                "payments.paypal.enabled needs payments.paypal.client_id and a secret: set "
                "ORDERD_PAYMENTS_PAYPAL_CLIENT_SECRET or payments.paypal.client_secret_file");
        return -1;
    }
    if (cfg->rs256_public_key_file[0]) {
        char *pem;
        size_t len;
        int e = read_small_file(cfg->rs256_public_key_file, &pem, &len);
        if (e == 0) {
            cfg->rs256_public_key_pem = pem;
        } else if (need) {
            set_err(err, errlen, "auth.rs256_public_key_file: cannot read %s: %s",
                    cfg->rs256_public_key_file,
                    e == EFBIG    ? "larger than 64 KiB"
                    : e == EINVAL ? "not a regular file"
                                  : strerror(e));
            return -1;
        }
    }
    if (need && !cfg->hs256_secret && !cfg->rs256_public_key_pem) {
        set_err(err, errlen,
                "no JWT key: set ORDERD_AUTH_HS256_SECRET or auth.hs256_secret_file, or "
                "auth.rs256_public_key_file");
        return -1;
    }
    if (need && !cfg->page_token_secret) {
        set_err(err, errlen,
                "no page token secret: set ORDERD_ORDERS_PAGE_TOKEN_SECRET or "
                "orders.page_token_secret_file");
        return -1;
    }
    if (check_secret_len(cfg, "auth.hs256_secret", cfg->hs256_secret_len, err, errlen) != 0 ||
        check_secret_len(cfg, "orders.page_token_secret", cfg->page_token_secret_len, err,
                         errlen) != 0)
        return -1;
    return 0;
}

/*
 * amqp.tls_*: a client certificate comes with its key (both or neither, whether or not TLS
 * is on: half a pair is a mistake either way). With SRV_CONFIG_NEED_SECRETS and TLS in
 * use, every file named must be a readable regular file, so that a typo stops the start
 * instead of turning into a reconnect loop. Only paths are ever echoed.
 */
static int check_amqp_tls(const srv_config *cfg, unsigned flags, char *err, size_t errlen)
{
    bool cert = cfg->amqp_tls_cert_file[0], key = cfg->amqp_tls_key_file[0];
    if (cert != key) {
        set_err(err, errlen,
                "%s is set but %s is not: a client certificate needs its key; set both "
                "(amqp.tls_cert_file and amqp.tls_key_file) or neither",
                cert ? "amqp.tls_cert_file" : "amqp.tls_key_file",
                cert ? "amqp.tls_key_file" : "amqp.tls_cert_file");
        return -1;
    }
    if (!(flags & SRV_CONFIG_NEED_SECRETS) || !cfg->amqp_enabled || !cfg->amqp_tls)
        return 0;
    static const struct {
        const char *name;
        size_t offset;
    } files[] = {
        {"amqp.tls_ca_file", offsetof(srv_config, amqp_tls_ca_file)},
        {"amqp.tls_cert_file", offsetof(srv_config, amqp_tls_cert_file)},
        {"amqp.tls_key_file", offsetof(srv_config, amqp_tls_key_file)},
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        const char *path = cfield(cfg, files[i].offset);
        if (!*path)
            continue;
        int e = 0, fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0)
            e = errno;
        else if (fstat(fd, &st) != 0)
            e = errno;
        else if (!S_ISREG(st.st_mode))
            e = EINVAL;
        if (fd >= 0)
            close(fd);
        if (e) {
            set_err(err, errlen, "%s: cannot read %s: %s", files[i].name, path,
                    e == EINVAL ? "not a regular file" : strerror(e));
            return -1;
        }
    }
    return 0;
}

/* ---- public ---------------------------------------------------------------- */

int srv_config_env_name(const char *yaml_path, char *out, size_t cap)
{
    static const char prefix[] = "ORDERD_";
    size_t n = strlen(yaml_path);
    if (cap < sizeof prefix + n) {
        if (cap)
            out[0] = '\0';
        return -1;
    }
    memcpy(out, prefix, sizeof prefix - 1);
    char *o = out + sizeof prefix - 1;
    for (const char *p = yaml_path; *p; p++)
        *o++ = (*p == '.' || *p == '-') ? '_' : (char)toupper((unsigned char)*p);
    *o = '\0';
    return 0;
}

static int set_location(const char *path, srv_config *out, char *err, size_t errlen)
{
    if (!path) {
        if (!getcwd(out->dir, sizeof out->dir)) {
            set_err(err, errlen, "cannot determine the working directory: %s", strerror(errno));
            return -1;
        }
        return 0;
    }
    if (!realpath(path, out->path)) {
        set_err(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    memcpy(out->dir, out->path, sizeof out->dir);
    char *slash = strrchr(out->dir, '/');
    if (slash == out->dir)
        slash[1] = '\0'; /* a file in / */
    else if (slash)
        *slash = '\0';
    return 0;
}

int srv_config_load(const char *path, unsigned flags, srv_config *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (err && errlen)
        err[0] = '\0';
    if (set_location(path, out, err, errlen) != 0)
        goto fail;

    for (size_t i = 0; i < NSETTINGS; i++) {
        if (!settings[i].def)
            continue;
        int rc = parse_value(&settings[i], settings[i].def, "default", out, err, errlen);
        assert(rc == 0 && "a default must pass its own checks");
        if (rc != 0)
            goto fail;
    }
    if (path && load_yaml(out->path, out, err, errlen) != 0)
        goto fail;
    if (load_env(out, err, errlen) != 0)
        goto fail;
    if (load_secrets(out, flags, err, errlen) != 0)
        goto fail;
    if (check_amqp_tls(out, flags, err, errlen) != 0)
        goto fail;
    return 0;
fail:
    srv_config_dispose(out);
    return -1;
}

void srv_config_dispose(srv_config *cfg)
{
    if (!cfg)
        return;
    if (cfg->pg_dsn)
        wipe_free(cfg->pg_dsn, strlen(cfg->pg_dsn));
    wipe_free(cfg->hs256_secret, cfg->hs256_secret_len);
    wipe_free(cfg->page_token_secret, cfg->page_token_secret_len);
    wipe_free(cfg->redis_password, cfg->redis_password_len);
    wipe_free(cfg->stripe_secret_key, cfg->stripe_secret_key_len);
    wipe_free(cfg->stripe_webhook_secret, cfg->stripe_webhook_secret_len);
    wipe_free(cfg->paypal_client_secret, cfg->paypal_client_secret_len);
    wipe_free(cfg->amqp_password, cfg->amqp_password_len);
    free(cfg->rs256_public_key_pem);
    memset(cfg, 0, sizeof *cfg);
}

/* ---- DSN masking ----------------------------------------------------------- */

typedef struct sbuf {
    char *buf;
    size_t cap, len;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n)
{
    if (b->cap == 0)
        return;
    size_t room = b->cap - 1 - b->len;
    if (n > room)
        n = room;
    memcpy(b->buf + b->len, s, n);
    b->len += n;
    b->buf[b->len] = '\0';
}

#define MASK "****"

/* libpq's secret keywords: the password, and the passphrase of the client key. */
static bool secret_key(const char *k, size_t n)
{
    return (n == 8 && strncmp(k, "password", 8) == 0) ||
           (n == 11 && strncmp(k, "sslpassword", 11) == 0);
}

/* postgresql://user:password@host/db?password=x&... */
static bool mask_uri(const char *dsn, const char *rest, sbuf *b)
{
    sb_put(b, dsn, (size_t)(rest - dsn));
    /* The user part ends at an '@' before the first '/'. libpq takes the first '@'; we
     * take the last, so a password holding a raw '@' or '?' is masked whole. */
    size_t authority = strcspn(rest, "/");
    const char *at = NULL;
    for (const char *c = rest; c < rest + authority; c++)
        if (*c == '@')
            at = c;
    if (at) {
        size_t span = (size_t)(at - rest);
        const char *colon = memchr(rest, ':', span);
        if (colon) {
            sb_put(b, rest, (size_t)(colon - rest) + 1);
            sb_put(b, MASK, strlen(MASK));
        } else {
            sb_put(b, rest, span);
        }
        sb_put(b, "@", 1);
        rest += span + 1;
    }
    const char *q = strchr(rest, '?');
    if (!q) {
        sb_put(b, rest, strlen(rest));
        return true;
    }
    sb_put(b, rest, (size_t)(q - rest) + 1);
    for (const char *p = q + 1; *p;) {
        size_t n = strcspn(p, "&");
        const char *eq = memchr(p, '=', n);
        /* libpq percent-decodes keywords too: an encoded one may be a password. */
        if (eq && (secret_key(p, (size_t)(eq - p)) || memchr(p, '%', (size_t)(eq - p)))) {
            sb_put(b, p, (size_t)(eq - p) + 1);
            sb_put(b, MASK, strlen(MASK));
        } else {
            sb_put(b, p, n);
        }
        p += n;
        if (*p == '&') {
            sb_put(b, "&", 1);
            p++;
        }
    }
    return true;
}

/* key = value pairs; values may be single-quoted with \' and \\ escapes. */
static bool mask_kv(const char *dsn, sbuf *b)
{
    const char *p = dsn;
    for (;;) {
        const char *ws = p;
        while (isspace((unsigned char)*p))
            p++;
        sb_put(b, ws, (size_t)(p - ws));
        if (!*p)
            return true;
        const char *key = p;
        while (isalnum((unsigned char)*p) || *p == '_')
            p++;
        size_t keylen = (size_t)(p - key);
        if (keylen == 0)
            return false;
        while (isspace((unsigned char)*p))
            p++;
        if (*p != '=')
            return false;
        p++;
        while (isspace((unsigned char)*p))
            p++;
        const char *val = p;
        if (*p == '\'') {
            for (p++; *p != '\''; p++) {
                if (!*p)
                    return false;
                if (*p == '\\' && p[1])
                    p++;
            }
            p++;
        } else {
            while (*p && !isspace((unsigned char)*p)) {
                if (*p == '\\' && p[1])
                    p++;
                p++;
            }
        }
        sb_put(b, key, keylen);
        sb_put(b, "=", 1);
        if (secret_key(key, keylen))
            sb_put(b, MASK, strlen(MASK));
        else
            sb_put(b, val, (size_t)(p - val));
    }
}

void srv_config_mask_dsn(const char *dsn, char *out, size_t cap)
{
    if (cap == 0)
        return;
    out[0] = '\0';
    if (!dsn)
        return;
    sbuf b = {out, cap, 0};
    bool ok;
    if (strncmp(dsn, "postgresql://", 13) == 0)
        ok = mask_uri(dsn, dsn + 13, &b);
    else if (strncmp(dsn, "postgres://", 11) == 0)
        ok = mask_uri(dsn, dsn + 11, &b);
    else
        ok = mask_kv(dsn, &b);
    if (!ok)
        snprintf(out, cap, "(hidden)");
}

/* ---- the effective settings, for the log ----------------------------------- */

static void format_value(const setting *s, const srv_config *cfg, char *buf, size_t cap)
{
    const void *src = cfield(cfg, s->offset);
    buf[0] = '\0';
    switch (s->type) {
    case ST_STRING:
    case ST_ENUM:
    case ST_PATH:
        snprintf(buf, cap, "%s", (const char *)src);
        break;
    case ST_HEAPSTR: {
        const char *v = *(char *const *)src;
        if (s->flags & SF_DSN)
            srv_config_mask_dsn(v ? v : "", buf, cap);
        else
            snprintf(buf, cap, "%s", v ? v : "");
        break;
    }
    case ST_INT:
        snprintf(buf, cap, "%lld",
                 s->size == sizeof(int32_t) ? (long long)*(const int32_t *)src
                                            : (long long)*(const int64_t *)src);
        break;
    case ST_DURATION:
        fmt_duration(*(const int64_t *)src, buf, cap);
        break;
    case ST_BOOL:
        snprintf(buf, cap, "%s", *(const bool *)src ? "true" : "false");
        break;
    case ST_LOGLEVEL: {
        static const char *const names[] = {"debug", "info", "warn", "error"};
        log_level l = *(const log_level *)src;
        snprintf(buf, cap, "%s", (unsigned)l < 4 ? names[l] : "?");
        break;
    }
    case ST_ROLES: {
        unsigned roles = *(const unsigned *)src;
        size_t n = 0;
        for (unsigned bit = 1; bit && bit <= roles; bit <<= 1) {
            const char *name = (roles & bit) ? srv_role_name(bit) : NULL;
            if (name && n < cap) {
                int w = snprintf(buf + n, cap - n, "%s%s", n ? "," : "", name);
                n += w > 0 ? (size_t)w : 0;
            }
        }
        break;
    }
    case ST_SECRET:
        snprintf(buf, cap, "%s", *(unsigned char *const *)src ? "(set)" : "(unset)");
        break;
    }
}

void srv_config_log(const srv_config *cfg)
{
    if (!log_enabled(LOG_INFO))
        return;
    char v[NSETTINGS][512];
    for (size_t i = 0; i < NSETTINGS; i++)
        format_value(&settings[i], cfg, v[i], sizeof v[i]);
    const char *keys[NSETTINGS + 3], *vals[NSETTINGS + 3];
    size_t n = 0;
    keys[n] = "config";
    vals[n++] = cfg->path[0] ? cfg->path : "(none)";
    for (size_t i = 0; i < NSETTINGS; i++) {
        keys[n] = settings[i].name;
        vals[n++] = v[i];
    }
    keys[n] = "auth.rs256_public_key";
    vals[n++] = cfg->rs256_public_key_pem ? "(set)" : "(unset)";
    log_fields(LOG_INFO, "configuration", keys, vals, n);
}
