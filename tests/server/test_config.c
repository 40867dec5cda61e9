/* test_config.c — server/config.c: the YAML file, environment overrides, secrets, the
 * log line. Each test runs in a fresh temporary directory with no ORDERD_* variables. */
#define _GNU_SOURCE /* nftw */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "orders/orders.h"
#include "server/config.h"

extern char **environ;

/* Every setting of the table, in its order; docs and config.yaml must name them all. */
static const char *const all_settings[] = {
    "environment",
    "server.listen",
    "server.workers",
    "server.max_receive_message_bytes",
    "server.max_send_message_bytes",
    "server.max_metadata_bytes",
    "server.shutdown_grace",
    "postgres.dsn",
    "postgres.statement_timeout",
    "auth.hs256_secret",
    "auth.hs256_secret_file",
    "auth.rs256_public_key_file",
    "auth.issuer",
    "auth.audience",
    "auth.reflection_role",
    "auth.token_ttl",
    "orders.tax_rate_bps",
    "orders.max_total_minor",
    "orders.page_token_secret",
    "orders.page_token_secret_file",
    "log.level",
    "amqp.tls",
    "amqp.tls_ca_file",
    "amqp.tls_cert_file",
    "amqp.tls_key_file",
    "amqp.tls_verify",
    "amqp.tls_server_name",
};
#define NALL (sizeof all_settings / sizeof all_settings[0])

#define SECRET_A "aaaaaaaaaaaaaaaa-secret-A-0123456789" /* 36 bytes */
#define SECRET_B "bbbbbbbbbbbbbbbb-secret-B-0123456789"

static char tmpdir[PATH_MAX];
static char cfgpath[PATH_MAX + 32];
static srv_config cfg; /* large: keep it off the stack */
static char err[1024];

/* ---- fixtures ---- */

static void clear_orderd_env(void)
{
    for (;;) {
        char name[256] = "";
        for (char **e = environ; *e; e++) {
            if (strncmp(*e, "ORDERD_", 7) == 0) {
                size_t n = strcspn(*e, "=");
                snprintf(name, sizeof name, "%.*s", (int)n, *e);
                break;
            }
        }
        if (!name[0])
            return;
        unsetenv(name);
    }
}

static void write_at(const char *rel, const char *content)
{
    char p[PATH_MAX + 256];
    snprintf(p, sizeof p, "%s/%s", tmpdir, rel);
    char *slash = strrchr(p, '/');
    *slash = '\0';
    mkdir(p, 0700); /* one level of sub-directory is enough here */
    *slash = '/';
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
}

static void write_config(const char *yaml)
{
    write_at("config.yaml", yaml);
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    (void)state;
    clear_orderd_env();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/orderd-test-config-XXXXXX");
    if (!mkdtemp(tmpdir))
        return -1;
    char real[PATH_MAX];
    if (!realpath(tmpdir, real))
        return -1;
    snprintf(tmpdir, sizeof tmpdir, "%s", real);
    snprintf(cfgpath, sizeof cfgpath, "%s/config.yaml", tmpdir);
    memset(&cfg, 0, sizeof cfg);
    err[0] = '\0';
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    srv_config_dispose(&cfg);
    clear_orderd_env();
    nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* stderr into a temporary file, for the log lines. */
typedef struct capture {
    int saved;
    int fd;
} capture;

static capture capture_begin(void)
{
    char p[PATH_MAX + 32];
    snprintf(p, sizeof p, "%s/stderr.XXXXXX", tmpdir);
    capture c = {.saved = dup(STDERR_FILENO), .fd = mkstemp(p)};
    assert_true(c.fd >= 0);
    unlink(p);
    fflush(stderr);
    dup2(c.fd, STDERR_FILENO);
    return c;
}

static char *capture_end(capture c)
{
    fflush(stderr);
    dup2(c.saved, STDERR_FILENO);
    close(c.saved);
    off_t n = lseek(c.fd, 0, SEEK_END);
    char *buf = calloc(1, (size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(pread(c.fd, buf, (size_t)n, 0), n);
    close(c.fd);
    return buf;
}

static int load(unsigned flags)
{
    srv_config_dispose(&cfg);
    return srv_config_load(cfgpath, flags, &cfg, err, sizeof err);
}

static void assert_contains(const char *hay, const char *needle)
{
    if (!strstr(hay, needle))
        fail_msg("expected \"%s\" in \"%s\"", needle, hay);
}

static void assert_not_contains(const char *hay, const char *needle)
{
    if (strstr(hay, needle))
        fail_msg("did not expect \"%s\" in \"%s\"", needle, hay);
}

/* ---- loading ---- */

static void test_defaults_without_file(void **state)
{
    (void)state;
    assert_int_equal(srv_config_load(NULL, 0, &cfg, err, sizeof err), 0);
    assert_string_equal(cfg.path, "");
    assert_string_equal(cfg.environment, "production"); /* the safe side */
    assert_string_equal(cfg.listen, "127.0.0.1:50051");
    assert_int_equal(cfg.workers, 8);
    assert_int_equal(cfg.max_receive_message_bytes, 4194304);
    assert_int_equal(cfg.max_send_message_bytes, 4194304);
    assert_int_equal(cfg.max_metadata_bytes, 16384);
    assert_int_equal(cfg.shutdown_grace_us, 10000000);
    assert_non_null(cfg.pg_dsn);
    assert_string_equal(cfg.pg_dsn, "");
    assert_int_equal(cfg.pg_statement_timeout_us, 5000000);
    assert_null(cfg.hs256_secret);
    assert_null(cfg.rs256_public_key_pem);
    assert_null(cfg.page_token_secret);
    assert_int_equal(cfg.reflection_roles, ORDER_ROLE_ADMIN);
    assert_int_equal(cfg.token_ttl_us, 15 * 60 * 1000000LL);
    assert_int_equal(cfg.tax_rate_bps, 0);
    assert_int_equal(cfg.max_total_minor, 99999999);
    assert_int_equal(cfg.log_level, LOG_INFO);
}

static void test_shipped_config_loads(void **state)
{
    (void)state;
    snprintf(cfgpath, sizeof cfgpath, "%s/config.yaml", ORDERD_SOURCE_DIR);
    assert_int_equal(load(0), 0);
    char dir[PATH_MAX], want[PATH_MAX + 64];
    assert_non_null(realpath(ORDERD_SOURCE_DIR, dir));
    assert_string_equal(cfg.dir, dir);
    assert_string_equal(cfg.environment, "development");
    assert_string_equal(cfg.listen, "127.0.0.1:50051");
    assert_int_equal(cfg.tax_rate_bps, 825);
    assert_int_equal(cfg.reflection_roles, ORDER_ROLE_ADMIN);
    assert_string_equal(cfg.issuer, "orderd-local");
    assert_string_equal(cfg.audience, "orderd");
    assert_string_equal(cfg.rs256_public_key_file, "");
    snprintf(want, sizeof want, "%s/.local/secrets/jwt-hs256", dir);
    assert_string_equal(cfg.hs256_secret_file, want);
    assert_contains(cfg.pg_dsn, "port=55432");
}

/* A file that sets every setting it may, none to its default. */
static const char full_yaml[] = "# every setting\n"
                                "environment: development\n"
                                "server:\n"
                                "  listen: 0.0.0.0:6000\n"
                                "  workers: 3\n"
                                "  max_receive_message_bytes: 2048\n"
                                "  max_send_message_bytes: 4096\n"
                                "  max_metadata_bytes: 9000\n"
                                "  shutdown_grace: 250ms\n"
                                "postgres:\n"
                                "  dsn: \"host=db port=1 dbname=x\"\n"
                                "  statement_timeout: 2m\n"
                                "auth:\n"
                                "  hs256_secret_file: secrets/hs\n"
                                "  rs256_public_key_file: keys/rs.pem\n"
                                "  issuer: iss-1\n"
                                "  audience: aud-1\n"
                                "  reflection_role: service, customer\n"
                                "  token_ttl: 1h\n"
                                "orders:\n"
                                "  tax_rate_bps: 10000\n"
                                "  max_total_minor: 9223372036854775807\n"
                                "  page_token_secret_file: secrets/pt\n"
                                "log:\n"
                                "  level: debug\n";

static void test_every_setting_from_yaml(void **state)
{
    (void)state;
    write_config(full_yaml);
    write_at("secrets/hs", SECRET_A "\n");
    write_at("secrets/pt", SECRET_B);
    write_at("keys/rs.pem", "-----BEGIN PUBLIC KEY-----\nxyz\n-----END PUBLIC KEY-----\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);
    assert_string_equal(cfg.path, cfgpath);
    assert_string_equal(cfg.dir, tmpdir);
    assert_string_equal(cfg.environment, "development");
    assert_string_equal(cfg.listen, "0.0.0.0:6000");
    assert_int_equal(cfg.workers, 3);
    assert_int_equal(cfg.max_receive_message_bytes, 2048);
    assert_int_equal(cfg.max_send_message_bytes, 4096);
    assert_int_equal(cfg.max_metadata_bytes, 9000);
    assert_int_equal(cfg.shutdown_grace_us, 250000);
    assert_string_equal(cfg.pg_dsn, "host=db port=1 dbname=x");
    assert_int_equal(cfg.pg_statement_timeout_us, 120000000LL);
    assert_int_equal(cfg.hs256_secret_len, strlen(SECRET_A));
    assert_memory_equal(cfg.hs256_secret, SECRET_A, strlen(SECRET_A));
    assert_non_null(cfg.rs256_public_key_pem);
    assert_contains(cfg.rs256_public_key_pem, "BEGIN PUBLIC KEY");
    assert_string_equal(cfg.issuer, "iss-1");
    assert_string_equal(cfg.audience, "aud-1");
    assert_int_equal(cfg.reflection_roles, ORDER_ROLE_SERVICE | ORDER_ROLE_CUSTOMER);
    assert_int_equal(cfg.token_ttl_us, 3600000000LL);
    assert_int_equal(cfg.tax_rate_bps, 10000);
    assert_true(cfg.max_total_minor == INT64_MAX);
    assert_int_equal(cfg.page_token_secret_len, strlen(SECRET_B));
    assert_memory_equal(cfg.page_token_secret, SECRET_B, strlen(SECRET_B));
    assert_int_equal(cfg.log_level, LOG_DEBUG);
}

static void test_empty_values_and_sections(void **state)
{
    (void)state;
    write_config("auth:\n  issuer: \"\"\n  audience: ~\n  reflection_role:\nlog:\n");
    assert_int_equal(load(0), 0);
    assert_string_equal(cfg.issuer, "");
    assert_string_equal(cfg.audience, "");
    assert_int_equal(cfg.reflection_roles, 0);
    assert_int_equal(cfg.log_level, LOG_INFO);

    write_config("");
    assert_int_equal(load(0), 0);
    assert_int_equal(cfg.workers, 8);
}

static void test_env_overrides_win(void **state)
{
    (void)state;
    write_config(full_yaml);
    setenv("ORDERD_ENVIRONMENT", "production", 1);
    setenv("ORDERD_SERVER_WORKERS", "12", 1);
    setenv("ORDERD_SERVER_LISTEN", "[::1]:7000", 1);
    setenv("ORDERD_POSTGRES_DSN", "postgresql://u@h/db", 1);
    setenv("ORDERD_POSTGRES_STATEMENT_TIMEOUT", "750ms", 1);
    setenv("ORDERD_AUTH_REFLECTION_ROLE", "", 1);
    setenv("ORDERD_AUTH_ISSUER", "", 1);
    setenv("ORDERD_AUTH_HS256_SECRET_FILE", "/nonexistent/hs", 1);
    setenv("ORDERD_ORDERS_TAX_RATE_BPS", "0", 1);
    setenv("ORDERD_ORDERS_MAX_TOTAL_MINOR", "100", 1);
    setenv("ORDERD_LOG_LEVEL", "error", 1);
    assert_int_equal(load(0), 0);
    assert_string_equal(cfg.environment, "production");
    assert_int_equal(cfg.workers, 12);
    assert_string_equal(cfg.listen, "[::1]:7000");
    assert_string_equal(cfg.pg_dsn, "postgresql://u@h/db");
    assert_int_equal(cfg.pg_statement_timeout_us, 750000);
    assert_int_equal(cfg.reflection_roles, 0);
    assert_string_equal(cfg.issuer, "");
    assert_string_equal(cfg.audience, "aud-1"); /* not overridden: the file's */
    assert_string_equal(cfg.hs256_secret_file, "/nonexistent/hs");
    assert_null(cfg.hs256_secret);
    assert_int_equal(cfg.tax_rate_bps, 0);
    assert_int_equal(cfg.max_total_minor, 100);
    assert_int_equal(cfg.log_level, LOG_ERROR);
}

static void test_env_bad_value_names_variable(void **state)
{
    (void)state;
    write_config("server:\n  workers: 4\n");
    setenv("ORDERD_SERVER_WORKERS", "lots", 1);
    assert_int_equal(load(0), -1);
    assert_contains(err, "ORDERD_SERVER_WORKERS");
    assert_contains(err, "server.workers");
    assert_contains(err, "1..256");
    /* a failed load leaves nothing to free */
    assert_null(cfg.pg_dsn);
}

static void test_unknown_env_variable_warns(void **state)
{
    (void)state;
    write_config("");
    setenv("ORDERD_SERVER_LISTN", "x", 1);
    setenv("ORDERD_SOMETHING_ELSE", "x", 1); /* not under a section: not ours to judge */
    capture c = capture_begin();
    int rc = load(0);
    char *out = capture_end(c);
    assert_int_equal(rc, 0);
    assert_contains(out, "ORDERD_SERVER_LISTN");
    assert_not_contains(out, "ORDERD_SOMETHING_ELSE");
    free(out);
}

/* Issue 3's sections: Redis, the cache and rate limits, from the file and the environment;
 * the Redis password only from the environment or its file, and never in the log line. */
static void test_redis_cache_ratelimit_settings(void **state)
{
    (void)state;
    write_config("redis:\n  host: 10.1.2.3\n  port: 7000\n  database: 3\n  timeout: 2ms\n"
                 "  reconnect_backoff_max: 500ms\n  tls: true\n  tls_ca_file: tls/ca.crt\n"
                 "  tls_cert_file: /abs/client.crt\n  tls_key_file: tls/client.key\n"
                 "  tls_server_name: redis.internal\n"
                 "cache:\n  enabled: false\n  order_ttl: 90s\n  key_prefix: \"t:\"\n"
                 "ratelimit:\n  enabled: true\n  replicas: 3\n  customer: 7/9\n"
                 "  overrides: \"PlaceOrder:customer=1/2\"\n");
    setenv("ORDERD_RATELIMIT_ADMIN", "5/6", 1);
    setenv("ORDERD_REDIS_PASSWORD", "redis-pass-from-env", 1);
    assert_int_equal(load(0), 0);
    assert_string_equal(cfg.redis_host, "10.1.2.3");
    assert_int_equal(cfg.redis_port, 7000);
    assert_int_equal(cfg.redis_database, 3);
    assert_int_equal(cfg.redis_timeout_us, 2000);
    assert_int_equal(cfg.redis_backoff_max_us, 500000);
    assert_true(cfg.redis_tls);
    char want_path[PATH_MAX + 32];
    snprintf(want_path, sizeof want_path, "%s/tls/ca.crt", tmpdir); /* relative to the file */
    assert_string_equal(cfg.redis_tls_ca_file, want_path);
    assert_string_equal(cfg.redis_tls_cert_file, "/abs/client.crt");
    snprintf(want_path, sizeof want_path, "%s/tls/client.key", tmpdir);
    assert_string_equal(cfg.redis_tls_key_file, want_path);
    assert_string_equal(cfg.redis_tls_server_name, "redis.internal");
    assert_false(cfg.cache_enabled);
    assert_int_equal(cfg.cache_order_ttl_us, 90 * 1000000LL);
    assert_string_equal(cfg.cache_key_prefix, "t:");
    assert_true(cfg.ratelimit_enabled);
    assert_int_equal(cfg.ratelimit_replicas, 3);
    assert_string_equal(cfg.ratelimit_customer, "7/9");
    assert_string_equal(cfg.ratelimit_service, "1000/2000"); /* the default */
    assert_string_equal(cfg.ratelimit_admin, "5/6");
    assert_string_equal(cfg.ratelimit_overrides, "PlaceOrder:customer=1/2");
    assert_int_equal(cfg.redis_password_len, strlen("redis-pass-from-env"));
    assert_memory_equal(cfg.redis_password, "redis-pass-from-env", cfg.redis_password_len);
    capture cap = capture_begin();
    srv_config_log(&cfg);
    char *logged = capture_end(cap);
    assert_null(strstr(logged, "redis-pass-from-env"));
    assert_non_null(strstr(logged, "\"redis.password\":\"(set)\""));
    free(logged);

    write_config("redis:\n  password: hunter2\n");
    assert_int_equal(load(0), -1);
    assert_null(strstr(err, "hunter2"));
}

/* amqp.tls_*: defaults, the file (paths relative to it), the environment. */
static void test_amqp_tls_settings(void **state)
{
    (void)state;
    assert_int_equal(srv_config_load(NULL, 0, &cfg, err, sizeof err), 0);
    assert_false(cfg.amqp_tls);
    assert_true(cfg.amqp_tls_verify); /* verified unless turned off */
    assert_string_equal(cfg.amqp_tls_ca_file, "");
    assert_string_equal(cfg.amqp_tls_cert_file, "");
    assert_string_equal(cfg.amqp_tls_key_file, "");
    assert_string_equal(cfg.amqp_tls_server_name, "");

    write_config("amqp:\n  port: 5671\n  tls: true\n  tls_ca_file: tls/ca.crt\n"
                 "  tls_cert_file: /abs/client.crt\n  tls_key_file: tls/client.key\n"
                 "  tls_verify: false\n  tls_server_name: rabbit.internal\n");
    assert_int_equal(load(0), 0);
    assert_true(cfg.amqp_tls);
    assert_false(cfg.amqp_tls_verify);
    char want[PATH_MAX + 32];
    snprintf(want, sizeof want, "%s/tls/ca.crt", tmpdir);
    assert_string_equal(cfg.amqp_tls_ca_file, want);
    assert_string_equal(cfg.amqp_tls_cert_file, "/abs/client.crt");
    snprintf(want, sizeof want, "%s/tls/client.key", tmpdir);
    assert_string_equal(cfg.amqp_tls_key_file, want);
    assert_string_equal(cfg.amqp_tls_server_name, "rabbit.internal");

    setenv("ORDERD_AMQP_TLS_VERIFY", "true", 1);
    setenv("ORDERD_AMQP_TLS_SERVER_NAME", "10.0.0.7", 1);
    setenv("ORDERD_AMQP_TLS_CA_FILE", "", 1); /* back to the system's store */
    assert_int_equal(load(0), 0);
    assert_true(cfg.amqp_tls_verify);
    assert_string_equal(cfg.amqp_tls_server_name, "10.0.0.7");
    assert_string_equal(cfg.amqp_tls_ca_file, "");

    setenv("ORDERD_AMQP_TLS", "maybe", 1);
    assert_int_equal(load(0), -1);
    assert_contains(err, "ORDERD_AMQP_TLS");
    assert_contains(err, "amqp.tls");
}

/* A client certificate without its key, or a key without its certificate, is refused at
 * load, whether or not TLS is on, and whichever source set it. */
static void test_amqp_tls_cert_and_key_go_together(void **state)
{
    (void)state;
    write_config("amqp:\n  tls: true\n  tls_cert_file: client.crt\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "amqp.tls_cert_file is set but amqp.tls_key_file is not");
    assert_contains(err, "both");

    write_config("amqp:\n  tls_key_file: client.key\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "amqp.tls_key_file is set but amqp.tls_cert_file is not");

    setenv("ORDERD_AMQP_TLS_CERT_FILE", "client.crt", 1);
    assert_int_equal(load(0), 0); /* the pair, from the file and the environment */

    write_config("amqp:\n  tls: true\n  tls_cert_file: client.crt\n  tls_key_file: client.key\n");
    setenv("ORDERD_AMQP_TLS_KEY_FILE", "", 1);
    unsetenv("ORDERD_AMQP_TLS_CERT_FILE");
    assert_int_equal(load(0), -1);
    assert_contains(err, "amqp.tls_cert_file is set but amqp.tls_key_file is not");
}

/* With SRV_CONFIG_NEED_SECRETS and TLS in use, the named files must be readable. */
static void test_amqp_tls_files_must_be_readable(void **state)
{
    (void)state;
    setenv("ORDERD_AUTH_HS256_SECRET", SECRET_A, 1);
    setenv("ORDERD_ORDERS_PAGE_TOKEN_SECRET", SECRET_B, 1);
    write_at("tls/ca.crt", "-----BEGIN CERTIFICATE-----\n");
    write_at("tls/client.crt", "-----BEGIN CERTIFICATE-----\n");
    write_at("tls/client.key", "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n");
    write_config("amqp:\n  tls: true\n  tls_ca_file: tls/ca.crt\n"
                 "  tls_cert_file: tls/client.crt\n  tls_key_file: tls/nope.key\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), -1);
    assert_contains(err, "amqp.tls_key_file: cannot read");
    assert_contains(err, "tls/nope.key");
    assert_contains(err, "No such file");
    assert_int_equal(load(0), 0); /* `orderd migrate` needs no broker */

    write_config("amqp:\n  tls: true\n  tls_ca_file: tls\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), -1);
    assert_contains(err, "amqp.tls_ca_file: cannot read");
    assert_contains(err, "not a regular file");

    /* Not checked when unused: TLS off, or AMQP off. */
    write_config("amqp:\n  tls: false\n  tls_ca_file: tls/nope.crt\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);
    write_config("amqp:\n  enabled: false\n  tls: true\n  tls_ca_file: tls/nope.crt\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);

    write_config("amqp:\n  tls: true\n  tls_ca_file: tls/ca.crt\n"
                 "  tls_cert_file: tls/client.crt\n  tls_key_file: tls/client.key\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);
    capture c = capture_begin();
    srv_config_log(&cfg);
    char *out = capture_end(c);
    assert_contains(out, "\"amqp.tls_key_file\":\"");
    assert_not_contains(out, "c2VjcmV0LWtleS1ieXRlcw"); /* a path is logged, never a key */
    free(out);
}

static void test_unknown_key_has_line(void **state)
{
    (void)state;
    write_config("server:\n  listen: x:1\n  listn: y\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "config.yaml:3:");
    assert_contains(err, "server.listn");

    write_config("environment: development\nverbose: true\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, ":2:");
    assert_contains(err, "\"verbose\"");

    write_config("server:\n  workers: 2\nmemcache:\n  ttl: 1s\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, ":3: unknown section \"memcache\"");

    write_config("server.listen: x:1\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "unknown setting");
}

static void test_out_of_range_names_key_line_range(void **state)
{
    (void)state;
    static const struct {
        const char *yaml, *want[3];
    } cases[] = {
        {"server:\n  workers: 0\n", {":2:", "server.workers", "1..256"}},
        {"server:\n  workers: 257\n", {":2:", "out of range", "1..256"}},
        {"\n\nserver:\n  workers: eight\n", {":4:", "not an integer", "1..256"}},
        {"orders:\n  tax_rate_bps: 10001\n", {":2:", "orders.tax_rate_bps", "0..10000"}},
        {"orders:\n  max_total_minor: 0\n", {":2:", "orders.max_total_minor", "1.."}},
        {"orders:\n  max_total_minor: 99999999999999999999\n", {":2:", "max_total_minor", "1.."}},
        {"server:\n  shutdown_grace: 2h\n", {":2:", "server.shutdown_grace", "0s..1h"}},
        {"postgres:\n  statement_timeout: soon\n", {":2:", "not a duration", "1ms..1h"}},
        {"auth:\n  token_ttl: 0s\n", {":2:", "auth.token_ttl", "1s..30d"}},
        {"environment: staging\n", {":1:", "environment", "development, production"}},
        {"log:\n  level: loud\n", {":2:", "log.level", "debug, info, warn, error"}},
        {"auth:\n  reflection_role: root\n", {":2:", "auth.reflection_role", "customer"}},
        {"server:\n  max_metadata_bytes: 100\n", {":2:", "max_metadata_bytes", "1024.."}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_config(cases[i].yaml);
        assert_int_equal(load(0), -1);
        for (size_t j = 0; j < 3 && cases[i].want[j]; j++)
            assert_contains(err, cases[i].want[j]);
    }
}

static void test_shape_errors(void **state)
{
    (void)state;
    write_config("server:\n  workers: [1, 2]\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "server.workers: expected a single value");

    write_config("server: 5\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "server: expected a mapping");

    write_config("environment:\n  a: b\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "environment");

    write_config("- a\n- b\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "top level");

    write_config("server:\n  workers: 2\n  workers: 3\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, ":3:");
    assert_contains(err, "twice");

    write_config("server:\n  workers: 2\nlog:\n  level: info\nserver:\n  listen: a:1\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, ":5:");

    write_config("server:\n  listen: \"a\\0b\"\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "NUL");

    write_config("server:\n  listen: [unclosed\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "invalid YAML");

    write_config("server:\n  workers: 2\n---\nserver:\n  workers: 3\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "one YAML document");

    char longv[400];
    memset(longv, 'x', sizeof longv - 1);
    longv[sizeof longv - 1] = '\0';
    char yaml[600];
    snprintf(yaml, sizeof yaml, "server:\n  listen: %s\n", longv);
    write_config(yaml);
    assert_int_equal(load(0), -1);
    assert_contains(err, "too long");

    snprintf(cfgpath, sizeof cfgpath, "%s/nope.yaml", tmpdir);
    assert_int_equal(load(0), -1);
    assert_contains(err, "nope.yaml");
}

static void test_secret_in_yaml_is_refused(void **state)
{
    (void)state;
    write_config("auth:\n  hs256_secret: " SECRET_A "\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, ":2:");
    assert_contains(err, "ORDERD_AUTH_HS256_SECRET");
    assert_not_contains(err, SECRET_A);

    write_config("orders:\n  page_token_secret: " SECRET_B "\n");
    assert_int_equal(load(0), -1);
    assert_contains(err, "ORDERD_ORDERS_PAGE_TOKEN_SECRET");
    assert_not_contains(err, SECRET_B);
}

/* ---- secrets ---- */

static void test_secret_env_wins_over_file(void **state)
{
    (void)state;
    write_config("auth:\n  hs256_secret_file: hs\norders:\n  page_token_secret_file: pt\n");
    write_at("hs", SECRET_A);
    write_at("pt", SECRET_A);
    setenv("ORDERD_AUTH_HS256_SECRET", SECRET_B, 1);
    setenv("ORDERD_ORDERS_PAGE_TOKEN_SECRET", SECRET_B "-pt", 1);
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);
    assert_int_equal(cfg.hs256_secret_len, strlen(SECRET_B));
    assert_memory_equal(cfg.hs256_secret, SECRET_B, strlen(SECRET_B));
    assert_int_equal(cfg.page_token_secret_len, strlen(SECRET_B "-pt"));
    assert_memory_equal(cfg.page_token_secret, SECRET_B "-pt", strlen(SECRET_B "-pt"));

    /* An empty variable counts as unset: the file is used. */
    setenv("ORDERD_AUTH_HS256_SECRET", "", 1);
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);
    assert_memory_equal(cfg.hs256_secret, SECRET_A, strlen(SECRET_A));
}

static void test_secret_file_relative_to_config_and_stripped(void **state)
{
    (void)state;
    write_config("auth:\n  hs256_secret_file: s/hs\norders:\n  page_token_secret_file: s/pt\n");
    write_at("s/hs", SECRET_A "\n\n \t\r\n");
    write_at("s/pt", SECRET_B " x \n"); /* inner spaces stay */
    char cwd[PATH_MAX];
    assert_non_null(getcwd(cwd, sizeof cwd));
    assert_int_equal(chdir("/"), 0); /* relative paths must not depend on the cwd */
    int rc = load(SRV_CONFIG_NEED_SECRETS);
    assert_int_equal(chdir(cwd), 0);
    assert_int_equal(rc, 0);
    char want[PATH_MAX + 16];
    snprintf(want, sizeof want, "%s/s/hs", tmpdir);
    assert_string_equal(cfg.hs256_secret_file, want);
    assert_int_equal(cfg.hs256_secret_len, strlen(SECRET_A));
    assert_memory_equal(cfg.hs256_secret, SECRET_A, strlen(SECRET_A));
    assert_int_equal(cfg.page_token_secret_len, strlen(SECRET_B " x"));
    assert_memory_equal(cfg.page_token_secret, SECRET_B " x", strlen(SECRET_B " x"));

    /* Relative paths given in the environment resolve the same way. */
    write_at("s/hs2", SECRET_B);
    setenv("ORDERD_AUTH_HS256_SECRET_FILE", "s/hs2", 1);
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);
    assert_memory_equal(cfg.hs256_secret, SECRET_B, strlen(SECRET_B));
}

static void test_missing_secrets_without_flag(void **state)
{
    (void)state;
    write_config("auth:\n  hs256_secret_file: nope/hs\n  rs256_public_key_file: nope/k.pem\n"
                 "orders:\n  page_token_secret_file: nope/pt\n");
    assert_int_equal(load(0), 0);
    assert_null(cfg.hs256_secret);
    assert_null(cfg.rs256_public_key_pem);
    assert_null(cfg.page_token_secret);
}

static void test_missing_secrets_with_flag(void **state)
{
    (void)state;
    /* A configured file that cannot be read. */
    write_config("auth:\n  hs256_secret_file: nope/hs\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), -1);
    assert_contains(err, "auth.hs256_secret_file");
    assert_contains(err, "nope/hs");

    /* No key at all. */
    write_config("orders:\n  page_token_secret_file: pt\n");
    write_at("pt", SECRET_B);
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), -1);
    assert_string_equal(err, "no JWT key: set ORDERD_AUTH_HS256_SECRET or auth.hs256_secret_file, "
                             "or auth.rs256_public_key_file");

    /* A JWT key but no page token secret. */
    setenv("ORDERD_AUTH_HS256_SECRET", SECRET_A, 1);
    write_config("");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), -1);
    assert_contains(err, "no page token secret");
    assert_contains(err, "ORDERD_ORDERS_PAGE_TOKEN_SECRET");

    /* An RS256 key alone is a JWT key. */
    unsetenv("ORDERD_AUTH_HS256_SECRET");
    write_at("k.pem", "-----BEGIN PUBLIC KEY-----\n");
    write_config("auth:\n  rs256_public_key_file: k.pem\norders:\n  page_token_secret_file: pt\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);
    assert_null(cfg.hs256_secret);
    assert_non_null(cfg.rs256_public_key_pem);

    /* An empty secret file is no secret. */
    write_at("empty", "\n\n");
    write_config("auth:\n  hs256_secret_file: empty\norders:\n  page_token_secret_file: pt\n");
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), -1);
    assert_contains(err, "empty");
}

static void test_short_secret_production_vs_development(void **state)
{
    (void)state;
    write_config("environment: production\n");
    setenv("ORDERD_AUTH_HS256_SECRET", "short-hs-value", 1);
    setenv("ORDERD_ORDERS_PAGE_TOKEN_SECRET", SECRET_B, 1);
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), -1);
    assert_contains(err, "auth.hs256_secret");
    assert_contains(err, "32");
    assert_not_contains(err, "short-hs-value");

    setenv("ORDERD_AUTH_HS256_SECRET", SECRET_A, 1);
    setenv("ORDERD_ORDERS_PAGE_TOKEN_SECRET", "short-pt-value", 1);
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), -1);
    assert_contains(err, "orders.page_token_secret");
    assert_not_contains(err, "short-pt-value");

    setenv("ORDERD_ENVIRONMENT", "development", 1);
    capture c = capture_begin();
    int rc = load(SRV_CONFIG_NEED_SECRETS);
    char *out = capture_end(c);
    assert_int_equal(rc, 0);
    assert_contains(out, "\"level\":\"warn\"");
    assert_contains(out, "orders.page_token_secret");
    assert_not_contains(out, "short-pt-value");
    free(out);
}

/* ---- the log line ---- */

static void test_log_line_masks_secrets(void **state)
{
    (void)state;
    write_config("environment: development\n"
                 "postgres:\n  dsn: \"host=db user=orderd password=hunter2-pw dbname=o\"\n"
                 "auth:\n  hs256_secret_file: hs\n");
    write_at("hs", SECRET_A);
    setenv("ORDERD_ORDERS_PAGE_TOKEN_SECRET", SECRET_B, 1);
    assert_int_equal(load(SRV_CONFIG_NEED_SECRETS), 0);

    capture c = capture_begin();
    srv_config_log(&cfg);
    char *out = capture_end(c);
    assert_not_contains(out, "hunter2");
    assert_not_contains(out, SECRET_A);
    assert_not_contains(out, SECRET_B);
    assert_int_equal(strchr(out, '\n') - out + 1, (long)strlen(out)); /* one line */

    json_error_t jerr;
    json_t *line = json_loads(out, 0, &jerr);
    if (!line)
        fail_msg("not JSON: %s: %s", jerr.text, out);
    assert_string_equal(json_string_value(json_object_get(line, "msg")), "configuration");
    assert_string_equal(json_string_value(json_object_get(line, "postgres.dsn")),
                        "host=db user=orderd password=**** dbname=o");
    assert_string_equal(json_string_value(json_object_get(line, "auth.hs256_secret")), "(set)");
    assert_string_equal(json_string_value(json_object_get(line, "orders.page_token_secret")),
                        "(set)");
    assert_string_equal(json_string_value(json_object_get(line, "auth.rs256_public_key")),
                        "(unset)");
    assert_string_equal(json_string_value(json_object_get(line, "server.shutdown_grace")), "10s");
    assert_string_equal(json_string_value(json_object_get(line, "auth.reflection_role")), "admin");
    for (size_t i = 0; i < NALL; i++)
        if (!json_object_get(line, all_settings[i]))
            fail_msg("%s missing from the log line", all_settings[i]);
    json_decref(line);
    free(out);
}

static void test_log_line_stays_utf8(void **state)
{
    (void)state;
    capture c = capture_begin();
    log_kv(LOG_ERROR, "http", LOG_F_STR, "path", "/\xff\xfe\xc3", LOG_F_STR, "ok",
           "caf\xc3\xa9 \xe2\x82\xac", LOG_F_END);
    char *out = capture_end(c);
    json_error_t jerr;
    json_t *line = json_loads(out, 0, &jerr); /* jansson refuses invalid UTF-8 */
    if (!line)
        fail_msg("not JSON: %s: %s", jerr.text, out);
    assert_string_equal(json_string_value(json_object_get(line, "path")),
                        "/\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(line, "ok")), "caf\xc3\xa9 \xe2\x82\xac");
    json_decref(line);
    free(out);
}

static void test_mask_dsn(void **state)
{
    (void)state;
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"host=h password=pw dbname=d", "host=h password=**** dbname=d"},
        {"password = 'a b\\' c' host=h", "password=**** host=h"},
        {"host=h", "host=h"},
        {"", ""},
        {"postgresql://u:pw@h:5432/db?sslmode=require",
         "postgresql://u:****@h:5432/db?sslmode=require"},
        {"postgres://u:p@ss?w@h/db", "postgres://u:****@h/db"},
        {"postgresql://u@h/db?password=pw&sslmode=x",
         "postgresql://u@h/db?password=****&sslmode=x"},
        {"postgresql://h/db", "postgresql://h/db"},
        {"host=h sslpassword=kp password=pw", "host=h sslpassword=**** password=****"},
        {"postgresql://u@h/db?sslpassword=kp&sslmode=x",
         "postgresql://u@h/db?sslpassword=****&sslmode=x"},
        {"postgresql://u@h/db?pass%77ord=pw", "postgresql://u@h/db?pass%77ord=****"},
        {"password='unterminated", "(hidden)"},
        {"just garbage", "(hidden)"},
    };
    char out[256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        srv_config_mask_dsn(cases[i].in, out, sizeof out);
        assert_string_equal(out, cases[i].out);
    }
    srv_config_mask_dsn("host=h password=pw", out, 5); /* truncates, terminates */
    assert_string_equal(out, "host");
}

static void test_env_name(void **state)
{
    (void)state;
    char out[64];
    assert_int_equal(srv_config_env_name("server.listen", out, sizeof out), 0);
    assert_string_equal(out, "ORDERD_SERVER_LISTEN");
    assert_int_equal(srv_config_env_name("environment", out, sizeof out), 0);
    assert_string_equal(out, "ORDERD_ENVIRONMENT");
    assert_int_equal(srv_config_env_name("auth.hs256_secret", out, sizeof out), 0);
    assert_string_equal(out, "ORDERD_AUTH_HS256_SECRET");
    assert_int_equal(srv_config_env_name("orders.page_token_secret", out, sizeof out), 0);
    assert_string_equal(out, "ORDERD_ORDERS_PAGE_TOKEN_SECRET");
    assert_int_equal(srv_config_env_name("server.listen", out, 20), -1);
    assert_int_equal(srv_config_env_name("server.listen", out, 21), 0);
}

/* Every setting is overridable: set each variable to a bad value, expect its name back. */
static void test_every_setting_has_env_override(void **state)
{
    (void)state;
    write_config("");
    for (size_t i = 0; i < NALL; i++) {
        char name[128];
        srv_config_env_name(all_settings[i], name, sizeof name);
        static const char *const free_form[] = {"server.listen",
                                                "postgres.dsn",
                                                "auth.hs256_secret",
                                                "auth.hs256_secret_file",
                                                "auth.rs256_public_key_file",
                                                "auth.issuer",
                                                "auth.audience",
                                                "orders.page_token_secret",
                                                "orders.page_token_secret_file",
                                                "amqp.tls_ca_file",
                                                "amqp.tls_cert_file",
                                                "amqp.tls_key_file",
                                                "amqp.tls_server_name"};
        bool skip = false;
        for (size_t j = 0; j < sizeof free_form / sizeof free_form[0]; j++)
            skip = skip || strcmp(all_settings[i], free_form[j]) == 0;
        if (skip)
            continue; /* any value is valid */
        setenv(name, "\x01 not valid \x01", 1);
        assert_int_equal(load(0), -1);
        assert_contains(err, name);
        unsetenv(name);
    }
    /* the free-form ones: the value arrives */
    setenv("ORDERD_AUTH_AUDIENCE", "a-from-env", 1);
    setenv("ORDERD_AUTH_RS256_PUBLIC_KEY_FILE", "/k.pem", 1);
    setenv("ORDERD_ORDERS_PAGE_TOKEN_SECRET_FILE", "/pt", 1);
    assert_int_equal(load(0), 0);
    assert_string_equal(cfg.audience, "a-from-env");
    assert_string_equal(cfg.rs256_public_key_file, "/k.pem");
    assert_string_equal(cfg.page_token_secret_file, "/pt");
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

static void test_docs_and_shipped_config_name_every_setting(void **state)
{
    (void)state;
    char *doc = read_text(ORDERD_SOURCE_DIR "/docs/configuration.md");
    assert_non_null(doc);
    for (size_t i = 0; i < NALL; i++) {
        char name[128], cell[160];
        srv_config_env_name(all_settings[i], name, sizeof name);
        snprintf(cell, sizeof cell, "`%s`", name);
        assert_contains(doc, cell);
        snprintf(cell, sizeof cell, "`%s`", all_settings[i]);
        assert_contains(doc, cell);
    }
    char *yaml = read_text(ORDERD_SOURCE_DIR "/config.yaml");
    assert_non_null(yaml);
    for (size_t i = 0; i < NALL; i++) {
        const char *key = strrchr(all_settings[i], '.');
        key = key ? key + 1 : all_settings[i];
        char line[128];
        snprintf(line, sizeof line, "%s:", key);
        if (strcmp(key, "hs256_secret") && strcmp(key, "page_token_secret"))
            assert_contains(yaml, line); /* the env-only secrets are only in comments */
    }
}

static void test_dispose_is_idempotent(void **state)
{
    (void)state;
    setenv("ORDERD_AUTH_HS256_SECRET", SECRET_A, 1);
    assert_int_equal(srv_config_load(NULL, 0, &cfg, err, sizeof err), 0);
    srv_config_dispose(&cfg);
    assert_null(cfg.hs256_secret);
    assert_int_equal(cfg.hs256_secret_len, 0);
    srv_config_dispose(&cfg);
    srv_config_dispose(NULL);
}

/* Bounded, deterministic mutation of the shipped file: the loader must answer 0 or -1
 * with a reason, never crash (ASan watches). */
static void test_fuzz_yaml(void **state)
{
    (void)state;
    char *orig = read_text(ORDERD_SOURCE_DIR "/config.yaml");
    assert_non_null(orig);
    size_t n = strlen(orig);
    char *buf = malloc(n + 64);
    assert_non_null(buf);
    static const char alphabet[] = ":-[]{}&*!|>'\"%@`#,?\n \t\\~0123456789abcxyz.";
    srand(12345);
    log_set_level(LOG_ERROR); /* mutated secrets files may warn */
    for (int iter = 0; iter < 400; iter++) {
        memcpy(buf, orig, n + 1);
        size_t len = n;
        int edits = 1 + rand() % 6;
        for (int e = 0; e < edits; e++) {
            size_t at = (size_t)rand() % (len ? len : 1);
            switch (rand() % 4) {
            case 0:
                buf[at] = alphabet[rand() % (sizeof alphabet - 1)];
                break;
            case 1:
                buf[at] = (char)(rand() % 256 ? rand() % 256 : 1);
                break;
            case 2:
                len = at;
                buf[len] = '\0';
                break;
            default:
                if (len + 1 < n + 63) {
                    memmove(buf + at + 1, buf + at, len - at + 1);
                    buf[at] = alphabet[rand() % (sizeof alphabet - 1)];
                    len++;
                }
            }
        }
        write_config(buf);
        err[0] = '\0';
        int rc = load(0);
        assert_true(rc == 0 || rc == -1);
        if (rc == -1)
            assert_true(err[0] != '\0');
    }
    log_set_level(LOG_INFO);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)
        T(test_defaults_without_file),
        T(test_shipped_config_loads),
        T(test_every_setting_from_yaml),
        T(test_empty_values_and_sections),
        T(test_env_overrides_win),
        T(test_env_bad_value_names_variable),
        T(test_unknown_env_variable_warns),
        T(test_redis_cache_ratelimit_settings),
        T(test_amqp_tls_settings),
        T(test_amqp_tls_cert_and_key_go_together),
        T(test_amqp_tls_files_must_be_readable),
        T(test_unknown_key_has_line),
        T(test_out_of_range_names_key_line_range),
        T(test_shape_errors),
        T(test_secret_in_yaml_is_refused),
        T(test_secret_env_wins_over_file),
        T(test_secret_file_relative_to_config_and_stripped),
        T(test_missing_secrets_without_flag),
        T(test_missing_secrets_with_flag),
        T(test_short_secret_production_vs_development),
        T(test_log_line_masks_secrets),
        T(test_mask_dsn),
        T(test_log_line_stays_utf8),
        T(test_env_name),
        T(test_every_setting_has_env_override),
        T(test_docs_and_shipped_config_name_every_setting),
        T(test_dispose_is_idempotent),
        T(test_fuzz_yaml),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
