/* tls.c — TLS to Redis without a TLS-capable hiredis: an in-process tunnel.
 *
 * DESIGN
 * Debian 12's hiredis (0.14) speaks plain TCP only, but it accepts any connected stream
 * socket through redisConnectFd. So a TLS connection is a socketpair(AF_UNIX): hiredis
 * gets one end (blocking, with its usual SO_RCVTIMEO / SO_SNDTIMEO from redisSetTimeout,
 * so every call stays bounded by the per-call timeout), and a small pump thread moves
 * bytes between the other end and an OpenSSL connection to Redis's TLS port.
 *
 * The TCP connect and the handshake each run on a non-blocking socket under poll(), each
 * bounded by the connect timeout. The peer is always verified (SSL_VERIFY_PEER against
 * the CA file), and so is its name (SSL_set1_host, or the IP address for a literal)
 * unless the caller turned that off. The pump stays non-blocking: it retries SSL_read
 * and SSL_write after every bit of progress, so bytes OpenSSL already decrypted
 * (SSL_pending) are delivered without waiting for the socket, and it polls for whatever
 * OpenSSL asked (WANT_READ / WANT_WRITE). It ends when either side closes or fails, and
 * then shuts its end of the pair down, which hiredis sees as a closed connection.
 * cache__tls_close shuts the pair down from outside (waking the pump), joins it and frees.
 */
#include "cache/internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "common/clock.h"

#define PUMP_BUF 16384

struct cache__tls {
    SSL_CTX *ctx;
    SSL *ssl;
    int tcp;     /* the TCP socket to Redis (non-blocking) */
    int pump_fd; /* the pump's end of the socketpair (non-blocking) */
    pthread_t th;
    bool started;
    char up[PUMP_BUF];   /* hiredis -> Redis, not yet taken by SSL_write */
    char down[PUMP_BUF]; /* Redis -> hiredis, not yet written to the pair */
};

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* Milliseconds left until deadline (monotonic us), at least 1 while time remains. */
static int ms_left(int64_t deadline)
{
    int64_t left = deadline - clock_mono_us();
    if (left <= 0)
        return 0;
    return left < 1000 ? 1 : (int)(left / 1000);
}

static void ssl_why(char *why, size_t cap, const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[200] = "unknown error";
    if (e)
        ERR_error_string_n(e, buf, sizeof buf);
    snprintf(why, cap, "tls: %s: %s", what, buf);
    ERR_clear_error();
}

/* Non-blocking TCP connect to host:port, tried address by address until the deadline. */
static int tcp_connect(const char *host, int port, int64_t deadline, char *why, size_t cap)
{
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int gai = getaddrinfo(host, portstr, &hints, &res);
    if (gai != 0) {
        snprintf(why, cap, "tls: resolve %s: %s", host, gai_strerror(gai));
        return -1;
    }
    int fd = -1;
    snprintf(why, cap, "tls: connect: no address");
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0 || set_nonblock(fd) != 0) {
            snprintf(why, cap, "tls: socket: %s", strerror(errno));
            goto next;
        }
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
            break;
        if (errno != EINPROGRESS) {
            snprintf(why, cap, "tls: connect: %s", strerror(errno));
            goto next;
        }
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int n;
        do
            n = poll(&p, 1, ms_left(deadline));
        while (n < 0 && errno == EINTR);
        if (n == 0) {
            snprintf(why, cap, "tls: connect: timed out");
            goto next;
        }
        int err = 0;
        socklen_t len = sizeof err;
        if (n < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err) {
            snprintf(why, cap, "tls: connect: %s", strerror(err ? err : errno));
            goto next;
        }
        break;
    next:
        if (fd >= 0)
            close(fd);
        fd = -1;
        if (clock_mono_us() >= deadline)
            break;
    }
    freeaddrinfo(res);
    return fd;
}

/* After an SSL_read/SSL_write that made no progress: adds the poll events OpenSSL waits
 * for to *ev and returns true, or false if the connection is over (closed, reset, TLS
 * error). */
static bool ssl_wants(SSL *ssl, int ret, short *ev)
{
    int e = SSL_get_error(ssl, ret);
    if (e == SSL_ERROR_WANT_READ)
        *ev |= POLLIN;
    else if (e == SSL_ERROR_WANT_WRITE)
        *ev |= POLLOUT;
    else
        return false;
    return true;
}

static void *pump(void *arg)
{
    struct cache__tls *t = arg;
    char *up = t->up, *down = t->down;
    size_t up_len = 0, up_off = 0, down_len = 0, down_off = 0;
    for (;;) {
        short tcp_ev, app_ev;
        bool progress;
        do {
            progress = false;
            tcp_ev = 0;
            app_ev = 0;
            /* hiredis -> buffer */
            if (up_len == 0) {
                ssize_t n = read(t->pump_fd, up, PUMP_BUF);
                if (n > 0) {
                    up_len = (size_t)n;
                    up_off = 0;
                    progress = true;
                } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                    goto done; /* hiredis closed (or the pair was shut down) */
                } else {
                    app_ev |= POLLIN;
                }
            }
            /* buffer -> TLS */
            if (up_len) {
                ERR_clear_error();
                int n = SSL_write(t->ssl, up + up_off, (int)(up_len - up_off));
                if (n > 0) {
                    up_off += (size_t)n;
                    if (up_off == up_len)
                        up_len = up_off = 0;
                    progress = true;
                } else if (!ssl_wants(t->ssl, n, &tcp_ev)) {
                    goto done;
                }
            }
            /* TLS -> buffer (also drains what OpenSSL holds decrypted: SSL_pending) */
            if (down_len == 0) {
                ERR_clear_error();
                int n = SSL_read(t->ssl, down, PUMP_BUF);
                if (n > 0) {
                    down_len = (size_t)n;
                    down_off = 0;
                    progress = true;
                } else if (!ssl_wants(t->ssl, n, &tcp_ev)) {
                    goto done; /* Redis closed, reset, or a TLS error */
                }
            }
            /* buffer -> hiredis */
            if (down_len) {
                ssize_t n = write(t->pump_fd, down + down_off, down_len - down_off);
                if (n > 0) {
                    down_off += (size_t)n;
                    if (down_off == down_len)
                        down_len = down_off = 0;
                    progress = true;
                } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
                    app_ev |= POLLOUT;
                } else {
                    goto done;
                }
            }
        } while (progress);
        /* The pair end is always polled: its hang-up (hiredis closed it, or
         * cache__tls_close shut it down) ends the pump even while the TLS side waits. */
        struct pollfd p[2] = {{.fd = tcp_ev ? t->tcp : -1, .events = tcp_ev},
                              {.fd = t->pump_fd, .events = app_ev}};
        int n = poll(p, 2, -1);
        if (n < 0 && errno != EINTR)
            goto done;
        if (n > 0 && (p[1].revents & (POLLHUP | POLLERR | POLLNVAL)))
            goto done;
    }
done:
    shutdown(t->pump_fd, SHUT_RDWR); /* hiredis sees the connection closed */
    return NULL;
}

void cache__tls_close(cache__tls *t)
{
    if (!t)
        return;
    if (t->started) {
        shutdown(t->pump_fd, SHUT_RDWR); /* wakes the pump */
        pthread_join(t->th, NULL);
    }
    if (t->ssl) {
        if (t->started)
            (void)SSL_shutdown(t->ssl); /* best effort close_notify; non-blocking */
        SSL_free(t->ssl);
    }
    if (t->ctx)
        SSL_CTX_free(t->ctx);
    if (t->tcp >= 0)
        close(t->tcp);
    if (t->pump_fd >= 0)
        close(t->pump_fd);
    ERR_clear_error();
    free(t);
}

static bool is_ip_literal(const char *s)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

int cache__tls_connect(const char *host, int port, const cache_tls_options *o, int64_t timeout_us,
                       int *app_fd, cache__tls **out, char *why, size_t cap)
{
    *out = NULL;
    *app_fd = -1;
    if (!o || !o->ca_file || !*o->ca_file) {
        snprintf(why, cap, "tls: a CA file is required");
        return -1;
    }
    const char *name = o->server_name && *o->server_name ? o->server_name : host;
    int pair[2] = {-1, -1};
    cache__tls *t = calloc(1, sizeof *t);
    if (!t) {
        snprintf(why, cap, "tls: out of memory");
        return -1;
    }
    t->tcp = t->pump_fd = -1;
    ERR_clear_error();

    t->ctx = SSL_CTX_new(TLS_client_method());
    if (!t->ctx) {
        ssl_why(why, cap, "SSL_CTX_new");
        goto fail;
    }
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_load_verify_locations(t->ctx, o->ca_file, NULL) != 1) {
        ssl_why(why, cap, "CA file");
        goto fail;
    }
    if (o->cert_file && *o->cert_file) {
        const char *key = o->key_file && *o->key_file ? o->key_file : o->cert_file;
        if (SSL_CTX_use_certificate_chain_file(t->ctx, o->cert_file) != 1) {
            ssl_why(why, cap, "client certificate");
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(t->ctx) != 1) {
            ssl_why(why, cap, "client key");
            goto fail;
        }
    }
    SSL_CTX_set_mode(t->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    t->ssl = SSL_new(t->ctx);
    if (!t->ssl) {
        ssl_why(why, cap, "SSL_new");
        goto fail;
    }
    if (is_ip_literal(name)) {
        /* No SNI for an address (RFC 6066); check it against the certificate's IP SANs. */
        if (o->verify && X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), name) != 1) {
            ssl_why(why, cap, "server name");
            goto fail;
        }
    } else {
        if (SSL_set_tlsext_host_name(t->ssl, name) != 1 ||
            (o->verify && SSL_set1_host(t->ssl, name) != 1)) {
            ssl_why(why, cap, "server name");
            goto fail;
        }
    }

    t->tcp = tcp_connect(host, port, clock_mono_us() + timeout_us, why, cap);
    if (t->tcp < 0)
        goto fail;
    if (SSL_set_fd(t->ssl, t->tcp) != 1) {
        ssl_why(why, cap, "SSL_set_fd");
        goto fail;
    }
    int64_t deadline = clock_mono_us() + timeout_us;
    for (;;) {
        ERR_clear_error();
        int r = SSL_connect(t->ssl);
        if (r == 1)
            break;
        int e = SSL_get_error(t->ssl, r);
        struct pollfd p = {.fd = t->tcp};
        if (e == SSL_ERROR_WANT_READ)
            p.events = POLLIN;
        else if (e == SSL_ERROR_WANT_WRITE)
            p.events = POLLOUT;
        else {
            long v = SSL_get_verify_result(t->ssl);
            if (v != X509_V_OK)
                snprintf(why, cap, "tls: certificate verification failed: %s",
                         X509_verify_cert_error_string(v));
            else if (e == SSL_ERROR_SYSCALL && !ERR_peek_error())
                snprintf(why, cap, "tls: handshake: connection closed by peer");
            else
                ssl_why(why, cap, "handshake");
            goto fail;
        }
        int n = poll(&p, 1, ms_left(deadline));
        if (n == 0) {
            snprintf(why, cap, "tls: handshake: timed out");
            goto fail;
        }
        if (n < 0 && errno != EINTR) {
            snprintf(why, cap, "tls: handshake: poll: %s", strerror(errno));
            goto fail;
        }
    }

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) {
        snprintf(why, cap, "tls: socketpair: %s", strerror(errno));
        goto fail;
    }
    t->pump_fd = pair[1];
    if (set_nonblock(t->pump_fd) != 0) {
        snprintf(why, cap, "tls: fcntl: %s", strerror(errno));
        goto fail;
    }
    int err = pthread_create(&t->th, NULL, pump, t);
    if (err) {
        snprintf(why, cap, "tls: pthread_create: %s", strerror(err));
        goto fail;
    }
    t->started = true;
    *app_fd = pair[0];
    *out = t;
    return 0;

fail:
    if (pair[0] >= 0)
        close(pair[0]);
    cache__tls_close(t);
    return -1;
}
