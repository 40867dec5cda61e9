/* config.h — orderd's configuration: config.yaml, then ORDERD_* environment overrides,
 * then secrets from the environment or from files.
 *
 * Every setting is one row of the table in config.c (yaml path, type, bounds, default,
 * target field, secret or not); docs/configuration.md lists them. The order of
 * precedence, lowest first: the table's default, the YAML file, the environment variable
 * ORDERD_<SECTION>_<KEY> (srv_config_env_name computes it). Secrets (the HS256 key, the
 * page token key) are never written in the YAML file: they come from their environment
 * variable, else from the file the YAML names. Relative file paths, from the file or the
 * environment, resolve against the directory of the config file.
 */
#ifndef ORDERD_SERVER_CONFIG_H
#define ORDERD_SERVER_CONFIG_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/log.h"

/** srv_config_load flag: fail unless a JWT key (HS256 secret or RS256 public key) and the
 *  page token secret are present, and every configured secret file can be read. The server
 *  passes it; `orderd migrate` does not (it needs no secrets). */
#define SRV_CONFIG_NEED_SECRETS 1u

/** Shortest secret accepted in production (a warning in development). */
#define SRV_CONFIG_MIN_SECRET_LEN 32

typedef struct srv_config {
    char path[PATH_MAX];  /* the config file, absolute; "" when loaded without one */
    char dir[PATH_MAX];   /* its directory: where relative file paths resolve */
    char environment[32]; /* "development" | "production" */

    /* server */
    char listen[256];
    int workers; /* 1..256 */
    int max_receive_message_bytes;
    int max_send_message_bytes;
    int max_metadata_bytes;
    int64_t shutdown_grace_us;

    /* postgres */
    char *pg_dsn; /* heap, never NULL after a successful load ("" = libpq defaults) */
    int64_t pg_statement_timeout_us;

    /* auth */
    unsigned char *hs256_secret; /* heap; NULL if none */
    size_t hs256_secret_len;
    char *rs256_public_key_pem; /* heap, the key file's contents; NULL if none */
    char issuer[256];           /* "" = iss not checked */
    char audience[256];         /* "" = aud not checked */
    unsigned reflection_roles;  /* ORDER_ROLE_* bits; 0 = reflection needs no token */
    int64_t token_ttl_us;

    /* orders */
    int32_t tax_rate_bps;             /* 0..10000 */
    int64_t max_total_minor;          /* > 0 */
    unsigned char *page_token_secret; /* heap; NULL if none */
    size_t page_token_secret_len;

    log_level log_level;

    /* redis */
    char redis_host[256];
    int redis_port;
    int redis_database;
    unsigned char *redis_password; /* heap; NULL if none */
    size_t redis_password_len;
    bool redis_tls;                     /* in-process OpenSSL tunnel (cache/tls.c) */
    char redis_tls_ca_file[PATH_MAX];   /* required with redis_tls; "" = none */
    char redis_tls_cert_file[PATH_MAX]; /* client certificate (mutual TLS); "" = none */
    char redis_tls_key_file[PATH_MAX];  /* its key; "" = inside the certificate file */
    char redis_tls_server_name[256];    /* SNI and the name verified; "" = redis_host */
    int64_t redis_timeout_us;           /* bound of one Redis call */
    int64_t redis_backoff_max_us;       /* reconnect back-off cap */

    /* cache */
    bool cache_enabled;
    int64_t cache_order_ttl_us;
    char cache_key_prefix[64];

    /* ratelimit: "rate/burst" per role, overrides "Method[:role]=rate/burst,..." */
    bool ratelimit_enabled;
    int ratelimit_replicas; /* the local fallback divides the rates by this */
    char ratelimit_customer[32];
    char ratelimit_service[32];
    char ratelimit_admin[32];
    char ratelimit_overrides[1024];

    /* orders: expiry of unpaid orders, settlement of payments a failure left unsettled */
    int64_t pending_ttl_us;    /* PENDING orders older than this become EXPIRED */
    int64_t sweep_interval_us; /* how often the sweeper looks */
    int sweep_batch;           /* orders per sweep round */
    int64_t settle_after_us;   /* retry a settlement this long after the last change */

    /* payments */
    bool local_enabled; /* the LOCAL development provider */
    bool stripe_enabled;
    char stripe_api_base[256];
    char stripe_api_version[32];
    unsigned char *stripe_secret_key; /* heap; NULL if none */
    size_t stripe_secret_key_len;
    unsigned char *stripe_webhook_secret; /* heap; NULL if none */
    size_t stripe_webhook_secret_len;
    int64_t stripe_webhook_tolerance_us;
    bool paypal_enabled;
    char paypal_api_base[256];
    char paypal_client_id[256];
    unsigned char *paypal_client_secret; /* heap; NULL if none */
    size_t paypal_client_secret_len;
    char paypal_webhook_id[128];
    char paypal_return_url[512];
    char paypal_cancel_url[512];
    char paypal_brand_name[128];
    int64_t pay_timeout_us; /* one provider attempt */
    int64_t pay_connect_timeout_us;
    int pay_max_attempts;
    int64_t pay_backoff_base_us;
    int64_t pay_backoff_max_us;
    char pay_ca_file[PATH_MAX]; /* "" = system trust store */

    /* http: the side port (webhooks, /metrics, /healthz) */
    char http_listen[256]; /* "host:port"; "" = off */
    int http_threads;
    int http_max_body_bytes;

    /* amqp */
    bool amqp_enabled;
    char amqp_host[256];
    int amqp_port;
    char amqp_vhost[128];
    char amqp_user[128];
    unsigned char *amqp_password; /* heap; NULL if none */
    size_t amqp_password_len;
    int amqp_heartbeat_s;
    int64_t amqp_timeout_us;
    int64_t amqp_backoff_max_us;
    bool amqp_tls;                     /* amqps, through rabbitmq-c's OpenSSL socket */
    char amqp_tls_ca_file[PATH_MAX];   /* "" = the system's default CA store */
    char amqp_tls_cert_file[PATH_MAX]; /* client certificate; set with its key or neither */
    char amqp_tls_key_file[PATH_MAX];  /* its key (PEM, not encrypted) */
    bool amqp_tls_verify;              /* chain and name; false: development only (warned) */
    char amqp_tls_server_name[256];    /* the name verified; "" = amqp_host */
    char amqp_exchange[128];
    bool amqp_declare_queues;
    char amqp_stock_queue[128];
    char amqp_order_queue[128];
    bool amqp_quorum_queues;
    bool amqp_consume_replies;
    char amqp_reply_queue[128];
    char amqp_reply_keys[256];
    char amqp_dead_letter_exchange[128];
    char amqp_dead_letter_queue[128];
    int amqp_prefetch;
    int amqp_reply_max_attempts;
    int amqp_relays; /* relay threads (and connections) in this process */
    int amqp_relay_batch;
    int64_t amqp_relay_idle_poll_us;
    int64_t amqp_relay_claim_us;
    int64_t amqp_relay_retry_max_us;
    int64_t outbox_retention_us;
    int64_t outbox_stats_interval_us;

    /* Where secrets were looked for: absolute paths, "" = not configured. Shown by
     * srv_config_log; the secrets themselves are above. */
    char hs256_secret_file[PATH_MAX];
    char rs256_public_key_file[PATH_MAX];
    char page_token_secret_file[PATH_MAX];
    char redis_password_file[PATH_MAX];
    char stripe_secret_key_file[PATH_MAX];
    char stripe_webhook_secret_file[PATH_MAX];
    char paypal_client_secret_file[PATH_MAX];
    char amqp_password_file[PATH_MAX];
} srv_config;

/**
 * Loads the configuration into *out (caller-allocated; its previous contents are
 * ignored): defaults, then the YAML file at `path` (NULL = no file, defaults and the
 * environment only, relative paths resolve against the working directory), then the
 * ORDERD_* environment, then the secrets. `flags` is 0 or SRV_CONFIG_NEED_SECRETS.
 *
 * Returns 0 on success; the caller releases *out with srv_config_dispose. Returns -1 on
 * failure with a one-line reason in err (file, line, setting, allowed range; never a
 * secret's value), and *out already disposed (disposing it again is harmless).
 * May log a warning (short secret in development, unknown ORDERD_* variable).
 */
int srv_config_load(const char *path, unsigned flags, srv_config *out, char *err, size_t errlen);

/** Frees what *cfg owns, overwriting secrets and the DSN first, and zeroes *cfg.
 *  Safe on a zeroed or already disposed config, and on NULL. */
void srv_config_dispose(srv_config *cfg);

/** Logs the effective settings as one JSON line at info level: secrets as "(set)" or
 *  "(unset)", the DSN with its password masked. */
void srv_config_log(const srv_config *cfg);

/** Writes the environment variable name of a setting ("server.listen" ->
 *  "ORDERD_SERVER_LISTEN"). Returns 0, or -1 if it does not fit in cap bytes. */
int srv_config_env_name(const char *yaml_path, char *out, size_t cap);

/** Copies a libpq connection string (key=value or URI form) with any password replaced
 *  by "****", for logs. A string it cannot parse becomes "(hidden)". Always
 *  NUL-terminates when cap > 0; truncates to cap. */
void srv_config_mask_dsn(const char *dsn, char *out, size_t cap);

#endif
