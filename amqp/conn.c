/* conn.c — one bounded rabbitmq-c connection for the relay or the consumer: connect, login,
 * channel, back-off with one log line per outage, topology, frame and content reads,
 * heartbeats for an idle owner. See conn.h for the design. */
#define _GNU_SOURCE /* pipe2 */
#include "amqp/conn.h"

#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"

#define BACKOFF_MIN_US (100 * 1000LL)

static bool tls_library(void);

static struct timeval tv_of(int64_t us)
{
    if (us < 0)
        us = 0;
    return (struct timeval){.tv_sec = (time_t)(us / 1000000),
                            .tv_usec = (suseconds_t)(us % 1000000)};
}

int64_t mq__min_pos(int64_t a, int64_t b)
{
    if (a <= 0)
        return b;
    if (b <= 0)
        return a;
    return a < b ? a : b;
}

int64_t mq__service_interval(const mq_conn *c)
{
    int hb = c->st ? amqp_get_heartbeat(c->st) : 0;
    return hb > 0 ? (int64_t)hb * 1000000 / 2 : INT64_MAX;
}

void mq__bytes_str(char *dst, size_t cap, amqp_bytes_t b)
{
    size_t n = b.len < cap - 1 ? b.len : cap - 1;
    if (n)
        memcpy(dst, b.bytes, n);
    dst[n] = '\0';
}

/* ---- the wake-up pipe and the stop flag ---- */

int mq__init(mq_conn *c, const amqp_settings *s, const char *role)
{
    memset(c, 0, sizeof *c);
    c->s = s;
    c->role = role;
    c->wake_rd = c->wake_wr = -1;
    atomic_init(&c->stop, false);
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0)
        return -1;
    c->wake_rd = p[0];
    c->wake_wr = p[1];
    if (s->tls)
        (void)tls_library(); /* once, on the starting thread; mq__connect reports a failure */
    return 0;
}

void mq__dispose(mq_conn *c)
{
    mq__drop(c);
    if (c->wake_rd >= 0)
        close(c->wake_rd);
    if (c->wake_wr >= 0)
        close(c->wake_wr);
    c->wake_rd = c->wake_wr = -1;
}

void mq__request_stop(mq_conn *c)
{
    atomic_store(&c->stop, true);
    char b = 1;
    /* Full pipe (EAGAIN): a wake-up is pending anyway. */
    ssize_t w = write(c->wake_wr, &b, 1);
    (void)w;
}

void mq__drain_wake(mq_conn *c)
{
    char buf[64];
    while (read(c->wake_rd, buf, sizeof buf) > 0)
        ;
}

void mq__sleep(mq_conn *c, int64_t us)
{
    int64_t end = clock_mono_us() + us;
    for (;;) {
        if (mq__stopping(c))
            return;
        int64_t now = clock_mono_us();
        if (now >= end)
            return;
        int64_t slice = end - now;
        int64_t svc = mq__service_interval(c);
        if (svc < slice)
            slice = svc;
        struct pollfd p = {.fd = c->wake_rd, .events = POLLIN};
        int r = poll(&p, 1, (int)((slice + 999) / 1000));
        if (r > 0)
            mq__drain_wake(c);
        if (c->st && svc != INT64_MAX && clock_mono_us() < end) {
            /* The broker's frames wait in the socket meanwhile; it only needs to hear
             * from us to keep the connection. */
            amqp_frame_t hb = {.frame_type = AMQP_FRAME_HEARTBEAT, .channel = 0};
            int rc = amqp_send_frame(c->st, &hb);
            if (rc != AMQP_STATUS_OK)
                mq__lost(c, amqp_error_string2(rc));
        }
    }
}

/* ---- TLS ---- */

/*
 * OpenSSL is set up once per process, before the first TLS socket, whichever thread gets
 * there first (pthread_once): mq__init calls it on the thread that starts a relay or the
 * consumer, mq__connect again on the owner's thread (a no-op then). OpenSSL 3 initializes
 * itself thread-safely; it is shared in this process with libpq, libcurl and the Redis
 * tunnel (cache/tls.c), so it is initialized here, explicitly and once, with
 * OPENSSL_init_ssl, and rabbitmq-c is told not to do it again
 * (amqp_set_initialize_ssl_library(0), before its first socket): its own set-up installs
 * OpenSSL 1.0-style locking callbacks that 3.x ignores. amqp_uninitialize_ssl_library is
 * never called: it would tear down state the other users share. rabbitmq-c still sets up
 * its BIO method once, under its own mutex, at the first amqp_ssl_socket_new. Each
 * connection has its own SSL_CTX (rabbitmq-c makes one per socket), used by one thread.
 */
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;
static bool tls_ok;

static void tls_init_once(void)
{
    tls_ok = OPENSSL_init_ssl(OPENSSL_INIT_LOAD_SSL_STRINGS | OPENSSL_INIT_LOAD_CRYPTO_STRINGS,
                              NULL) == 1;
    amqp_set_initialize_ssl_library(0);
}

static bool tls_library(void)
{
    pthread_once(&tls_once, tls_init_once);
    return tls_ok;
}

/*
 * What the handshake on this thread went through, for its error message. The callbacks
 * below run inside amqp_socket_open_noblock on the thread that called it, and each
 * connection belongs to one thread, so a thread-local is enough.
 */
static _Thread_local struct {
    bool started;     /* TCP was up and the TLS handshake began */
    char verify[200]; /* the first certificate verification failure */
} tls_diag;

static void tls_info_cb(const SSL *ssl, int where, int ret)
{
    if (where & SSL_CB_HANDSHAKE_START)
        tls_diag.started = true;
}

static int tls_verify_cb(int ok, X509_STORE_CTX *x)
{
    if (!ok && !tls_diag.verify[0]) {
        char subject[120] = "";
        X509 *cert = X509_STORE_CTX_get_current_cert(x);
        if (cert)
            X509_NAME_oneline(X509_get_subject_name(cert), subject, sizeof subject);
        snprintf(tls_diag.verify, sizeof tls_diag.verify, "%s (depth %d%s%s)",
                 X509_verify_cert_error_string(X509_STORE_CTX_get_error(x)),
                 X509_STORE_CTX_get_error_depth(x), subject[0] ? ", subject " : "", subject);
    }
    return ok;
}

/* A key file that turns out to be encrypted fails to load instead of prompting for a
 * passphrase on a terminal, which is what OpenSSL's default callback would do. */
static int tls_no_passphrase(char *buf, int size, int rwflag, void *u)
{
    return 0;
}

/* The oldest error in this thread's OpenSSL queue (the cause; the rest is what followed
 * from it), as its reason text, into dst; the queue is emptied. "" if none. */
static const char *ssl_error(char *dst, size_t cap)
{
    unsigned long first = ERR_get_error(), e;
    while ((e = ERR_get_error()) != 0)
        ;
    dst[0] = '\0';
    if (first) {
        const char *reason = ERR_reason_error_string(first);
        if (reason)
            snprintf(dst, cap, "%s", reason);
        else
            ERR_error_string_n(first, dst, cap);
    }
    return dst;
}

static bool is_ip_literal(const char *name)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, name, buf) == 1 || inet_pton(AF_INET6, name, buf) == 1;
}

/* Whether `path` can be opened for reading; else the reason, in c->error. */
static bool readable(mq_conn *c, const char *setting, const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(c->error, sizeof c->error, "tls: %s %s: %s", setting, path, strerror(errno));
        return false;
    }
    close(fd);
    return true;
}

/* The TLS socket of c->st, configured from the settings; NULL with c->error set. */
static amqp_socket_t *tls_socket(mq_conn *c)
{
    const amqp_settings *s = c->s;
    char why[160];
    bool has_cert = s->tls_cert_file && *s->tls_cert_file;
    bool has_key = s->tls_key_file && *s->tls_key_file;
    if (!tls_library()) {
        snprintf(c->error, sizeof c->error, "tls: OpenSSL could not be initialized: %s",
                 ssl_error(why, sizeof why));
        return NULL;
    }
    if (has_cert != has_key) {
        snprintf(c->error, sizeof c->error,
                 "tls: a client certificate needs both amqp.tls_cert_file and amqp.tls_key_file");
        return NULL;
    }
    ERR_clear_error();
    amqp_socket_t *sock = amqp_ssl_socket_new(c->st);
    if (!sock) {
        snprintf(c->error, sizeof c->error, "tls: cannot create a TLS socket: %s",
                 ssl_error(why, sizeof why));
        return NULL;
    }
    SSL_CTX *ctx = amqp_ssl_socket_get_context(sock);
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_default_passwd_cb(ctx, tls_no_passphrase);
    SSL_CTX_set_info_callback(ctx, tls_info_cb);

    if (s->tls_ca_file && *s->tls_ca_file) {
        if (!readable(c, "amqp.tls_ca_file", s->tls_ca_file))
            return NULL;
        if (amqp_ssl_socket_set_cacert(sock, s->tls_ca_file) != AMQP_STATUS_OK) {
            snprintf(c->error, sizeof c->error, "tls: amqp.tls_ca_file %s: no CA loaded: %s",
                     s->tls_ca_file, ssl_error(why, sizeof why));
            return NULL;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        snprintf(c->error, sizeof c->error, "tls: the system's CA store: %s",
                 ssl_error(why, sizeof why));
        return NULL;
    }
    if (has_cert) {
        if (!readable(c, "amqp.tls_cert_file", s->tls_cert_file) ||
            !readable(c, "amqp.tls_key_file", s->tls_key_file))
            return NULL;
        /* Paths only: the key's contents never reach a log line. */
        if (amqp_ssl_socket_set_key(sock, s->tls_cert_file, s->tls_key_file) != AMQP_STATUS_OK ||
            SSL_CTX_check_private_key(ctx) != 1) {
            snprintf(c->error, sizeof c->error,
                     "tls: client certificate %s with key %s cannot be used: %s", s->tls_cert_file,
                     s->tls_key_file, ssl_error(why, sizeof why));
            return NULL;
        }
    }

    /* rabbitmq-c 0.11's own host-name check compares the host connected to with the
     * certificate's DNS names only (no IP addresses, no other name): OpenSSL checks the
     * name instead, during the handshake, from the SSL_CTX's parameters that every SSL
     * made from it inherits. rabbitmq-c's peer check (the verification result, after the
     * handshake) stays on as a second look. */
    amqp_ssl_socket_set_verify_hostname(sock, 0);
    if (s->tls_skip_verify) {
        amqp_ssl_socket_set_verify_peer(sock, 0);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        return sock;
    }
    amqp_ssl_socket_set_verify_peer(sock, 1);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, tls_verify_cb);
    const char *name = s->tls_server_name && *s->tls_server_name ? s->tls_server_name : s->host;
    X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    int ok = is_ip_literal(name) ? X509_VERIFY_PARAM_set1_ip_asc(param, name)
                                 : X509_VERIFY_PARAM_set1_host(param, name, 0);
    if (ok != 1) {
        snprintf(c->error, sizeof c->error, "tls: cannot verify the name \"%s\": %s", name,
                 ssl_error(why, sizeof why));
        return NULL;
    }
    return sock;
}

/* c->error for a failed amqp_socket_open_noblock on a TLS socket. */
static void tls_open_failed(mq_conn *c, int rc)
{
    const amqp_settings *s = c->s;
    char why[200];
    if (!tls_diag.started) {
        /* TCP itself failed (refused, unreachable, timed out): no TLS was spoken. */
        ERR_clear_error();
        snprintf(c->error, sizeof c->error, "connect to %s:%d: %s", s->host, s->port,
                 amqp_error_string2(rc));
        return;
    }
    if (tls_diag.verify[0]) {
        const char *name = s->tls_server_name && *s->tls_server_name ? s->tls_server_name : s->host;
        ERR_clear_error();
        snprintf(c->error, sizeof c->error,
                 "tls handshake with %s:%d failed: certificate verify failed: %.120s; "
                 "verified name %s",
                 s->host, s->port, tls_diag.verify, name);
        return;
    }
    if (rc == AMQP_STATUS_TIMEOUT) {
        ERR_clear_error();
        snprintf(c->error, sizeof c->error,
                 "tls handshake with %s:%d failed: timed out (no TLS answer within the "
                 "timeout)",
                 s->host, s->port);
        return;
    }
    ssl_error(why, sizeof why);
    snprintf(c->error, sizeof c->error, "tls handshake with %s:%d failed: %s", s->host, s->port,
             why[0] ? why : amqp_error_string2(rc));
}

/* ---- connecting ---- */

static void reply_text(char *dst, size_t cap, amqp_rpc_reply_t r)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        snprintf(dst, cap, "ok");
        return;
    case AMQP_RESPONSE_NONE:
        snprintf(dst, cap, "no RPC reply");
        return;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(dst, cap, "%s", amqp_error_string2(r.library_error));
        return;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        break;
    }
    char text[200];
    if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD && r.reply.decoded) {
        const amqp_connection_close_t *m = r.reply.decoded;
        mq__bytes_str(text, sizeof text, m->reply_text);
        snprintf(dst, cap, "connection closed by the broker: %u %.150s", m->reply_code, text);
    } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD && r.reply.decoded) {
        const amqp_channel_close_t *m = r.reply.decoded;
        mq__bytes_str(text, sizeof text, m->reply_text);
        snprintf(dst, cap, "channel closed by the broker: %u %.150s", m->reply_code, text);
    } else {
        snprintf(dst, cap, "unexpected broker method 0x%08x", (unsigned)r.reply.id);
    }
}

int mq__connect(mq_conn *c)
{
    const amqp_settings *s = c->s;
    mq__drop(c);
    c->st = amqp_new_connection();
    if (!c->st) {
        snprintf(c->error, sizeof c->error, "out of memory");
        return -1;
    }
    amqp_socket_t *sock = s->tls ? tls_socket(c) : amqp_tcp_socket_new(c->st);
    if (!sock) {
        if (!s->tls)
            snprintf(c->error, sizeof c->error, "cannot create a socket");
        goto fail;
    }
    struct timeval tv = tv_of(s->timeout_us);
    /* With TLS this is the TCP connect and the handshake, both under this one deadline:
     * rabbitmq-c 0.11 polls its non-blocking socket for whatever SSL_connect waits for
     * (tests/amqp/test_tls.c holds it to that against a peer that never answers). */
    if (s->tls) {
        memset(&tls_diag, 0, sizeof tls_diag);
        ERR_clear_error();
    }
    int rc = amqp_socket_open_noblock(sock, s->host, s->port, &tv);
    if (rc != AMQP_STATUS_OK) {
        if (s->tls)
            tls_open_failed(c, rc);
        else
            snprintf(c->error, sizeof c->error, "connect to %s:%d: %s", s->host, s->port,
                     amqp_error_string2(rc));
        goto fail;
    }
    /* Bounds writes (amqp_basic_publish, heartbeats): the kernel fails the connection when
     * what was sent stays unacknowledged this long, instead of blocking for ~15 minutes.
     * The same file descriptor carries the TLS records. */
    int fd = amqp_socket_get_sockfd(sock);
    unsigned int uto = (unsigned int)(s->timeout_us / 1000);
    if (fd >= 0 && uto > 0)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &uto, sizeof uto);
    amqp_set_handshake_timeout(c->st, &tv);
    amqp_set_rpc_timeout(c->st, &tv);
    amqp_rpc_reply_t r =
        amqp_login(c->st, s->vhost && *s->vhost ? s->vhost : "/", 0, AMQP_DEFAULT_FRAME_SIZE,
                   s->heartbeat_s > 0 ? s->heartbeat_s : 0, AMQP_SASL_METHOD_PLAIN,
                   s->user ? s->user : "", s->password ? s->password : "");
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char t[200], why[120] = "";
        reply_text(t, sizeof t, r);
        /* Under TLS 1.3 a broker that refuses the client certificate says so after the
         * client's side of the handshake is done: it surfaces here, as an alert. */
        if (s->tls)
            ssl_error(why, sizeof why);
        snprintf(c->error, sizeof c->error, "login to %s:%d: %s", s->host, s->port, t);
        if (why[0]) {
            size_t n = strlen(c->error);
            snprintf(c->error + n, sizeof c->error - n, ": tls: %s", why);
        }
        goto fail;
    }
    c->ch = 1;
    amqp_channel_open(c->st, c->ch);
    if (mq__rpc_check(c, "channel.open", NULL) != 0)
        goto fail;
    c->last_rx_us = clock_mono_us();
    return 0;
fail:
    mq__drop(c);
    return -1;
}

bool mq__due(const mq_conn *c, int64_t now_us)
{
    return now_us >= c->next_attempt_us;
}

bool mq__up(mq_conn *c)
{
    const amqp_settings *s = c->s;
    bool again = c->ever_up;
    if (c->outage) {
        log_kv(LOG_INFO, "rabbitmq connection restored", LOG_F_STR, "role", c->role, LOG_F_STR,
               "host", s->host, LOG_F_INT, "port", (int64_t)s->port, LOG_F_INT, "outage_ms",
               (clock_mono_us() - c->outage_since_us) / 1000, LOG_F_INT, "failed_attempts",
               (int64_t)c->failures, LOG_F_END);
    } else if (!again) {
        log_kv(LOG_INFO, "rabbitmq connected", LOG_F_STR, "role", c->role, LOG_F_STR, "host",
               s->host, LOG_F_INT, "port", (int64_t)s->port, LOG_F_STR, "tls",
               !s->tls              ? "off"
               : s->tls_skip_verify ? "on, peer NOT verified"
                                    : "on, verified",
               LOG_F_INT, "heartbeat_s", (int64_t)amqp_get_heartbeat(c->st), LOG_F_END);
    }
    c->outage = false;
    c->failures = 0;
    c->backoff_us = 0;
    c->next_attempt_us = 0;
    c->ever_up = true;
    c->last_rx_us = clock_mono_us();
    return again;
}

void mq__failed(mq_conn *c, const char *what)
{
    const amqp_settings *s = c->s;
    mq__drop(c);
    int64_t max = s->backoff_max_us > 0 ? s->backoff_max_us : 30 * 1000000LL;
    c->backoff_us = c->backoff_us ? c->backoff_us * 2 : BACKOFF_MIN_US;
    if (c->backoff_us > max)
        c->backoff_us = max;
    int64_t now = clock_mono_us();
    c->next_attempt_us = now + c->backoff_us;
    c->failures++;
    if (!c->outage) {
        c->outage = true;
        c->outage_since_us = now;
        log_kv(LOG_WARN, "rabbitmq connection or topology failed; retrying with back-off",
               LOG_F_STR, "role", c->role, LOG_F_STR, "host", s->host, LOG_F_INT, "port",
               (int64_t)s->port, LOG_F_STR, "step", what, LOG_F_STR, "error", c->error, LOG_F_INT,
               "backoff_max_ms", max / 1000, LOG_F_END);
    } else if (log_enabled(LOG_DEBUG)) {
        log_kv(LOG_DEBUG, "rabbitmq attempt failed", LOG_F_STR, "role", c->role, LOG_F_STR, "step",
               what, LOG_F_STR, "error", c->error, LOG_F_INT, "retry_in_ms", c->backoff_us / 1000,
               LOG_F_END);
    }
}

void mq__lost(mq_conn *c, const char *why)
{
    if (why != c->error)
        snprintf(c->error, sizeof c->error, "%s", why);
    log_kv(LOG_WARN, "rabbitmq connection lost; reconnecting", LOG_F_STR, "role", c->role,
           LOG_F_STR, "host", c->s->host, LOG_F_INT, "port", (int64_t)c->s->port, LOG_F_STR,
           "error", c->error, LOG_F_END);
    mq__drop(c);
    /* Reconnect at once; if that fails, this outage has been logged already. */
    c->outage = true;
    c->outage_since_us = clock_mono_us();
    c->failures = 0;
    c->backoff_us = 0;
    c->next_attempt_us = 0;
}

void mq__drop(mq_conn *c)
{
    if (!c->st)
        return;
    /* Closes the socket. Sends nothing over TCP; over TLS a close_notify alert, on the
     * non-blocking socket, so it cannot wait either. */
    amqp_destroy_connection(c->st);
    c->st = NULL;
}

void mq__close(mq_conn *c)
{
    if (!c->st)
        return;
    amqp_channel_close(c->st, c->ch, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c->st, AMQP_REPLY_SUCCESS);
    mq__drop(c);
}

/* ---- RPC replies and topology ---- */

int mq__rpc_check(mq_conn *c, const char *what, int *code)
{
    if (code)
        *code = 0;
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c->st);
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    char t[220];
    reply_text(t, sizeof t, r);
    snprintf(c->error, sizeof c->error, "%s: %s", what, t);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
        r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_ok_t ok = {0};
        amqp_send_method(c->st, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        return -1;
    }
    if (r.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION || r.reply.id != AMQP_CHANNEL_CLOSE_METHOD)
        return -1;
    /* The broker closed the channel: acknowledge, and carry on with a fresh one. */
    const amqp_channel_close_t *m = r.reply.decoded;
    if (code && m)
        *code = m->reply_code;
    amqp_channel_close_ok_t ok = {0};
    if (amqp_send_method(c->st, c->ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != AMQP_STATUS_OK)
        return -1;
    c->ch++;
    amqp_channel_open(c->st, c->ch);
    r = amqp_get_rpc_reply(c->st);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        reply_text(t, sizeof t, r);
        snprintf(c->error, sizeof c->error, "channel.open after a channel error: %s", t);
        return -1;
    }
    return 1;
}

int mq__declare_exchange(mq_conn *c, const char *name, const char *type)
{
    amqp_exchange_declare(c->st, c->ch, amqp_cstring_bytes(name), amqp_cstring_bytes(type), 0, 1, 0,
                          0, amqp_empty_table);
    char what[300];
    snprintf(what, sizeof what, "exchange.declare %s (%s, durable)", name, type);
    return mq__rpc_check(c, what, NULL) == 0 ? 0 : -1;
}

int mq__declare_queue(mq_conn *c, const char *name, bool quorum, const char *dlx)
{
    amqp_table_entry_t e[2];
    int n = 0;
    if (quorum) {
        e[n].key = amqp_cstring_bytes("x-queue-type");
        e[n].value.kind = AMQP_FIELD_KIND_UTF8;
        e[n].value.value.bytes = amqp_cstring_bytes("quorum");
        n++;
    }
    if (dlx && *dlx) {
        e[n].key = amqp_cstring_bytes("x-dead-letter-exchange");
        e[n].value.kind = AMQP_FIELD_KIND_UTF8;
        e[n].value.value.bytes = amqp_cstring_bytes(dlx);
        n++;
    }
    amqp_table_t args = {.num_entries = n, .entries = e};
    amqp_queue_declare(c->st, c->ch, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
    char what[300];
    snprintf(what, sizeof what, "queue.declare %s", name);
    int code;
    int rc = mq__rpc_check(c, what, &code);
    if (rc == 0)
        return 0;
    if (rc == 1 && code == AMQP_PRECONDITION_FAILED) {
        /* Declared before with other arguments (say, classic vs quorum, or another
         * dead-letter exchange): redeclaring can never succeed, and deleting it would lose
         * messages. Use it as it is and say so loudly; an operator must reconcile. */
        log_kv(LOG_ERROR,
               "rabbitmq queue exists with other arguments; using it as it is (delete it or "
               "align the configuration to apply them)",
               LOG_F_STR, "role", c->role, LOG_F_STR, "queue", name, LOG_F_STR, "wanted_type",
               quorum ? "quorum" : "classic", LOG_F_STR, "dead_letter_exchange", dlx, LOG_F_STR,
               "error", c->error, LOG_F_END);
        return 0;
    }
    return -1;
}

int mq__bind(mq_conn *c, const char *queue, const char *exchange, const char *key)
{
    amqp_queue_bind(c->st, c->ch, amqp_cstring_bytes(queue), amqp_cstring_bytes(exchange),
                    amqp_cstring_bytes(key), amqp_empty_table);
    char what[600];
    snprintf(what, sizeof what, "queue.bind %s to %s (%s)", queue, exchange, key);
    return mq__rpc_check(c, what, NULL) == 0 ? 0 : -1;
}

/* ---- frames ---- */

int mq__wait_frame(mq_conn *c, amqp_frame_t *f, int64_t deadline_us)
{
    if (!c->st)
        return AMQP_STATUS_CONNECTION_CLOSED;
    struct timeval tv = tv_of(deadline_us - clock_mono_us());
    int rc = amqp_simple_wait_frame_noblock(c->st, f, &tv);
    if (rc == AMQP_STATUS_OK)
        c->last_rx_us = clock_mono_us();
    return rc;
}

void mq__on_close_frame(mq_conn *c, const amqp_frame_t *f)
{
    char text[200] = "";
    unsigned code = 0;
    if (f->payload.method.id == AMQP_CHANNEL_CLOSE_METHOD) {
        const amqp_channel_close_t *m = f->payload.method.decoded;
        code = m->reply_code;
        mq__bytes_str(text, sizeof text, m->reply_text);
        amqp_channel_close_ok_t ok = {0};
        amqp_send_method(c->st, f->channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        snprintf(c->error, sizeof c->error, "channel closed by the broker: %u %s", code, text);
    } else {
        const amqp_connection_close_t *m = f->payload.method.decoded;
        code = m->reply_code;
        mq__bytes_str(text, sizeof text, m->reply_text);
        amqp_connection_close_ok_t ok = {0};
        amqp_send_method(c->st, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
        snprintf(c->error, sizeof c->error, "connection closed by the broker: %u %s", code, text);
    }
    mq__lost(c, c->error);
}

static bool is_close_frame(const amqp_frame_t *f)
{
    return f->frame_type == AMQP_FRAME_METHOD &&
           (f->payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
            f->payload.method.id == AMQP_CONNECTION_CLOSE_METHOD);
}

int mq__service(mq_conn *c, void (*on_frame)(void *arg, const amqp_frame_t *f), void *arg)
{
    if (!c->st)
        return -1;
    /* rabbitmq-c swallows the broker's heartbeats without a trace: readable data is how
     * this side learns the broker is alive. */
    struct pollfd p = {.fd = amqp_get_sockfd(c->st), .events = POLLIN};
    if (p.fd >= 0 && poll(&p, 1, 0) > 0)
        c->last_rx_us = clock_mono_us();
    while (!mq__stopping(c)) {
        amqp_frame_t f;
        /* A past deadline: consume what is there, send a heartbeat if one is due. */
        int rc = mq__wait_frame(c, &f, 0);
        if (rc == AMQP_STATUS_TIMEOUT)
            break;
        if (rc != AMQP_STATUS_OK) {
            mq__lost(c, amqp_error_string2(rc));
            return -1;
        }
        if (is_close_frame(&f)) {
            mq__on_close_frame(c, &f);
            return -1;
        }
        if (on_frame)
            on_frame(arg, &f);
        if (!c->st)
            return -1;
        amqp_maybe_release_buffers(c->st);
    }
    int hb = amqp_get_heartbeat(c->st);
    if (hb > 0 && clock_mono_us() - c->last_rx_us > 2 * (int64_t)hb * 1000000) {
        mq__lost(c, "no heartbeat from the broker for two intervals");
        return -1;
    }
    return 0;
}

int mq__read_content(mq_conn *c, int64_t deadline_us, size_t body_cap, mq_content *out)
{
    memset(out, 0, sizeof *out);
    amqp_frame_t f;
    int rc = mq__wait_frame(c, &f, deadline_us);
    if (rc != AMQP_STATUS_OK) {
        snprintf(c->error, sizeof c->error, "reading a content header: %s", amqp_error_string2(rc));
        return -1;
    }
    if (f.frame_type != AMQP_FRAME_HEADER || f.channel != c->ch) {
        snprintf(c->error, sizeof c->error, "expected a content header, got frame type %u",
                 (unsigned)f.frame_type);
        return -1;
    }
    const amqp_basic_properties_t *p = f.payload.properties.decoded;
    if (p && (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG)) {
        out->has_message_id = true;
        mq__bytes_str(out->message_id, sizeof out->message_id, p->message_id);
    }
    if (p && (p->_flags & AMQP_BASIC_TYPE_FLAG))
        mq__bytes_str(out->type, sizeof out->type, p->type);
    if (p && (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG))
        mq__bytes_str(out->content_type, sizeof out->content_type, p->content_type);
    out->body_size = f.payload.properties.body_size;
    size_t cap = out->body_size < body_cap ? (size_t)out->body_size : body_cap;
    out->body = malloc(cap + 1);
    if (!out->body) {
        snprintf(c->error, sizeof c->error, "out of memory");
        return -1;
    }
    uint64_t got = 0;
    while (got < out->body_size) {
        rc = mq__wait_frame(c, &f, deadline_us);
        if (rc != AMQP_STATUS_OK) {
            snprintf(c->error, sizeof c->error, "reading a content body: %s",
                     amqp_error_string2(rc));
            goto fail;
        }
        if (f.frame_type != AMQP_FRAME_BODY || f.channel != c->ch) {
            snprintf(c->error, sizeof c->error, "expected a content body, got frame type %u",
                     (unsigned)f.frame_type);
            goto fail;
        }
        amqp_bytes_t b = f.payload.body_fragment;
        size_t keep = cap - out->len < b.len ? cap - out->len : b.len;
        if (keep)
            memcpy(out->body + out->len, b.bytes, keep);
        out->len += keep;
        got += b.len;
    }
    out->body[out->len] = '\0';
    return 0;
fail:
    mq__content_free(out);
    return -1;
}

void mq__content_free(mq_content *m)
{
    free(m->body);
    m->body = NULL;
    m->len = 0;
}
