/* amqptest.c — shared set-up of the amqp tests; see amqptest.h. */
#include "amqptest.h"

#include <amqp_tcp_socket.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/clock.h"

static char url_buf[512];
static struct amqp_connection_info info;
static char prog_name[32];

int amqpt_setup(const char *prog)
{
    const char *env = getenv("ORDERD_TEST_AMQP_URL");
    if (!env || !*env) {
        fprintf(stderr, "FAIL: ORDERD_TEST_AMQP_URL is not set. The amqp tests run against a "
                        "real RabbitMQ; set it to an AMQP URL, e.g.\n"
                        "  ORDERD_TEST_AMQP_URL='amqp://guest:guest@127.0.0.1:55672/'\n");
        return -1;
    }
    snprintf(url_buf, sizeof url_buf, "%s", env);
    amqp_default_connection_info(&info);
    if (amqp_parse_url(url_buf, &info) != AMQP_STATUS_OK) {
        fprintf(stderr, "FAIL: ORDERD_TEST_AMQP_URL is not an AMQP URL\n");
        return -1;
    }
    snprintf(prog_name, sizeof prog_name, "%s", prog);
    srand((unsigned)(time(NULL) ^ getpid()));
    return 0;
}

void amqpt_name(char *buf, size_t cap, const char *what)
{
    static int counter;
    snprintf(buf, cap, "t.%s.%d.%d.%04x.%s", prog_name, (int)getpid(), ++counter,
             (unsigned)rand() & 0xffff, what);
}

void amqpt_settings(amqp_settings *s)
{
    memset(s, 0, sizeof *s);
    s->host = info.host;
    s->port = info.port;
    s->vhost = info.vhost && *info.vhost ? info.vhost : "/";
    s->user = info.user;
    s->password = info.password;
    s->heartbeat_s = 5;
    s->timeout_us = 2 * 1000000;
    s->backoff_max_us = 500 * 1000;
    s->declare_queues = true;
    s->quorum_queues = false;
    s->reply_keys = "stock.reserved,stock.rejected";
    s->prefetch = 5;
    s->relay_batch = 50;
    s->relay_idle_poll_us = 200 * 1000;
    s->relay_claim_us = 30 * 1000000;
    s->relay_retry_max_us = 1000 * 1000;
    s->outbox_retention_us = 0;
    s->stats_interval_us = 200 * 1000;
}

int amqpt_closed_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd); /* never listened: connecting gets ECONNREFUSED */
    return ntohs(a.sin_port);
}

/* ---- the raw client ---- */

static void check(amqp_connection_state_t c, const char *what)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c);
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return;
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
        fail_msg("%s: %s", what, amqp_error_string2(r.library_error));
    if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_t *m = r.reply.decoded;
        fail_msg("%s: channel closed: %u %.*s", what, m->reply_code, (int)m->reply_text.len,
                 (char *)m->reply_text.bytes);
    }
    fail_msg("%s: server exception 0x%08x", what, (unsigned)r.reply.id);
}

amqp_connection_state_t amqpt_connect(void)
{
    amqp_connection_state_t c = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(c);
    assert_non_null(sock);
    struct timeval tv = {5, 0};
    if (amqp_socket_open_noblock(sock, info.host, info.port, &tv) != AMQP_STATUS_OK)
        fail_msg("cannot connect to %s:%d", info.host, info.port);
    amqp_set_rpc_timeout(c, &tv);
    amqp_rpc_reply_t r =
        amqp_login(c, info.vhost && *info.vhost ? info.vhost : "/", 0, AMQP_DEFAULT_FRAME_SIZE, 0,
                   AMQP_SASL_METHOD_PLAIN, info.user, info.password);
    if (r.reply_type != AMQP_RESPONSE_NORMAL)
        fail_msg("login failed");
    amqp_channel_open(c, 1);
    check(c, "channel.open");
    return c;
}

void amqpt_close(amqp_connection_state_t c)
{
    if (!c)
        return;
    amqp_channel_close(c, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c);
}

void amqpt_exchange(amqp_connection_state_t c, const char *name, const char *type)
{
    amqp_exchange_declare(c, 1, amqp_cstring_bytes(name), amqp_cstring_bytes(type), 0, 1, 0, 0,
                          amqp_empty_table);
    check(c, "exchange.declare");
}

static void recover_channel(amqp_connection_state_t c);

static void queue_declare(amqp_connection_state_t c, const char *name, bool quorum, const char *dlx)
{
    amqp_table_entry_t e[2];
    int n = 0;
    if (quorum) {
        e[n].key = amqp_cstring_bytes("x-queue-type");
        e[n].value.kind = AMQP_FIELD_KIND_UTF8;
        e[n].value.value.bytes = amqp_cstring_bytes("quorum");
        n++;
    }
    if (dlx) {
        e[n].key = amqp_cstring_bytes("x-dead-letter-exchange");
        e[n].value.kind = AMQP_FIELD_KIND_UTF8;
        e[n].value.value.bytes = amqp_cstring_bytes(dlx);
        n++;
    }
    amqp_table_t args = {.num_entries = n, .entries = e};
    amqp_queue_declare(c, 1, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
}

void amqpt_queue(amqp_connection_state_t c, const char *name, bool quorum, const char *dlx)
{
    queue_declare(c, name, quorum, dlx);
    check(c, "queue.declare");
}

int amqpt_queue_try(amqp_connection_state_t c, const char *name, bool quorum, const char *dlx)
{
    queue_declare(c, name, quorum, dlx);
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c);
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    if (r.reply_type != AMQP_RESPONSE_SERVER_EXCEPTION || r.reply.id != AMQP_CHANNEL_CLOSE_METHOD)
        fail_msg("queue.declare %s: no answer", name);
    int code = ((amqp_channel_close_t *)r.reply.decoded)->reply_code;
    recover_channel(c);
    return code;
}

void amqpt_bind(amqp_connection_state_t c, const char *q, const char *ex, const char *key)
{
    amqp_queue_bind(c, 1, amqp_cstring_bytes(q), amqp_cstring_bytes(ex), amqp_cstring_bytes(key),
                    amqp_empty_table);
    check(c, "queue.bind");
}

/* After a channel error: acknowledge it and open channel 1 again. */
static void recover_channel(amqp_connection_state_t c)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c);
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_ok_t ok = {0};
        amqp_send_method(c, 1, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        amqp_channel_open(c, 1);
        check(c, "channel.open");
    }
}

void amqpt_delete_queue(amqp_connection_state_t c, const char *q)
{
    if (!q)
        return;
    amqp_queue_delete(c, 1, amqp_cstring_bytes(q), 0, 0);
    recover_channel(c);
}

void amqpt_delete_exchange(amqp_connection_state_t c, const char *ex)
{
    if (!ex)
        return;
    amqp_exchange_delete(c, 1, amqp_cstring_bytes(ex), 0);
    recover_channel(c);
}

int64_t amqpt_count(amqp_connection_state_t c, const char *q)
{
    amqp_queue_declare_ok_t *ok =
        amqp_queue_declare(c, 1, amqp_cstring_bytes(q), 1, 0, 0, 0, amqp_empty_table);
    if (!ok) {
        recover_channel(c);
        return -1;
    }
    return ok->message_count;
}

void amqpt_publish(amqp_connection_state_t c, const char *ex, const char *key,
                   const char *message_id, const char *body)
{
    amqp_basic_properties_t p = {0};
    p._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    p.delivery_mode = AMQP_DELIVERY_PERSISTENT;
    p.content_type = amqp_cstring_bytes("application/json");
    if (message_id) {
        p._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
        p.message_id = amqp_cstring_bytes(message_id);
    }
    int rc = amqp_basic_publish(c, 1, amqp_cstring_bytes(ex), amqp_cstring_bytes(key), 0, 0, &p,
                                amqp_cstring_bytes(body));
    assert_int_equal(rc, AMQP_STATUS_OK);
}

void amqpt_consume(amqp_connection_state_t c, const char *q)
{
    amqp_basic_consume(c, 1, amqp_cstring_bytes(q), amqp_empty_bytes, 0, 1, 0, amqp_empty_table);
    check(c, "basic.consume");
}

static void copy_bytes(char *dst, size_t cap, amqp_bytes_t b)
{
    size_t n = b.len < cap - 1 ? b.len : cap - 1;
    if (n)
        memcpy(dst, b.bytes, n);
    dst[n] = '\0';
}

bool amqpt_next(amqp_connection_state_t c, amqpt_msg *m, int64_t timeout_us)
{
    memset(m, 0, sizeof *m);
    amqp_maybe_release_buffers(c);
    amqp_envelope_t env;
    struct timeval tv = {(time_t)(timeout_us / 1000000), (suseconds_t)(timeout_us % 1000000)};
    amqp_rpc_reply_t r = amqp_consume_message(c, &env, &tv, 0);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
            r.library_error == AMQP_STATUS_TIMEOUT)
            return false;
        fail_msg("consume: reply type %d, error %s", r.reply_type,
                 amqp_error_string2(r.library_error));
    }
    copy_bytes(m->routing_key, sizeof m->routing_key, env.routing_key);
    copy_bytes(m->exchange, sizeof m->exchange, env.exchange);
    amqp_basic_properties_t *p = &env.message.properties;
    if (p->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) {
        m->has_message_id = true;
        copy_bytes(m->message_id, sizeof m->message_id, p->message_id);
    }
    if (p->_flags & AMQP_BASIC_TYPE_FLAG)
        copy_bytes(m->type, sizeof m->type, p->type);
    if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
        copy_bytes(m->content_type, sizeof m->content_type, p->content_type);
    if (p->_flags & AMQP_BASIC_APP_ID_FLAG)
        copy_bytes(m->app_id, sizeof m->app_id, p->app_id);
    if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG)
        m->delivery_mode = p->delivery_mode;
    if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG) {
        m->has_timestamp = true;
        m->timestamp = p->timestamp;
    }
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
        for (int i = 0; i < p->headers.num_entries; i++) {
            amqp_table_entry_t *e = &p->headers.entries[i];
            if (e->key.len == 8 && memcmp(e->key.bytes, "order_id", 8) == 0 &&
                (e->value.kind == AMQP_FIELD_KIND_UTF8 || e->value.kind == AMQP_FIELD_KIND_BYTES))
                copy_bytes(m->header_order_id, sizeof m->header_order_id, e->value.value.bytes);
        }
    }
    m->len = env.message.body.len;
    m->body = malloc(m->len + 1);
    assert_non_null(m->body);
    if (m->len)
        memcpy(m->body, env.message.body.bytes, m->len);
    m->body[m->len] = '\0';
    amqp_destroy_envelope(&env);
    return true;
}

void amqpt_msg_free(amqpt_msg *m)
{
    free(m->body);
    m->body = NULL;
}

bool amqpt_wait(bool (*cond)(void *arg), void *arg, int64_t timeout_us)
{
    int64_t end = clock_mono_us() + timeout_us;
    for (;;) {
        if (cond(arg))
            return true;
        if (clock_mono_us() >= end)
            return cond(arg);
        usleep(20 * 1000);
    }
}

/* ---- the proxy ---- */

#define PROXY_MAX 16

struct amqpt_proxy {
    char host[64];
    int port;   /* forwarded to */
    int listen; /* fd */
    int lport;
    int wake[2];
    pthread_t thread;
    pthread_mutex_t mu;
    bool frozen, stop, cut;
    int accepted;
    int a[PROXY_MAX], b[PROXY_MAX]; /* client side, server side; -1 = free */
};

static int dial(const char *host, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (fd < 0 || inet_pton(AF_INET, host, &a.sin_addr) != 1 ||
        connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

static void pair_close(amqpt_proxy *p, int i)
{
    close(p->a[i]);
    close(p->b[i]);
    p->a[i] = p->b[i] = -1;
}

/* Moves what is readable on `from` to `to`; false when either side is done. */
static bool pump(int from, int to)
{
    char buf[16384];
    ssize_t n = recv(from, buf, sizeof buf, MSG_DONTWAIT);
    if (n <= 0)
        return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    for (ssize_t off = 0; off < n;) {
        ssize_t w = send(to, buf + off, (size_t)(n - off), MSG_NOSIGNAL);
        if (w <= 0)
            return false;
        off += w;
    }
    return true;
}

static void *proxy_main(void *arg)
{
    amqpt_proxy *p = arg;
    for (;;) {
        struct pollfd fds[2 + 2 * PROXY_MAX];
        int idx[2 + 2 * PROXY_MAX];
        int n = 0;
        pthread_mutex_lock(&p->mu);
        bool stop = p->stop, frozen = p->frozen, cut = p->cut;
        p->cut = false;
        pthread_mutex_unlock(&p->mu);
        if (stop)
            break;
        for (int i = 0; i < PROXY_MAX && cut; i++)
            if (p->a[i] >= 0)
                pair_close(p, i);
        fds[n++] = (struct pollfd){.fd = p->wake[0], .events = POLLIN};
        fds[n++] = (struct pollfd){.fd = p->listen, .events = POLLIN};
        for (int i = 0; i < PROXY_MAX && !frozen; i++) {
            if (p->a[i] < 0)
                continue;
            idx[n] = i;
            fds[n++] = (struct pollfd){.fd = p->a[i], .events = POLLIN};
            idx[n] = i;
            fds[n++] = (struct pollfd){.fd = p->b[i], .events = POLLIN};
        }
        if (poll(fds, (nfds_t)n, 1000) <= 0)
            continue;
        if (fds[0].revents) {
            char c[16];
            while (read(p->wake[0], c, sizeof c) > 0)
                ;
        }
        if (fds[1].revents & POLLIN) {
            int c = accept(p->listen, NULL, NULL);
            if (c >= 0) {
                int s = dial(p->host, p->port);
                int slot = -1;
                for (int i = 0; i < PROXY_MAX && slot < 0; i++)
                    if (p->a[i] < 0)
                        slot = i;
                if (s < 0 || slot < 0) {
                    close(c);
                    if (s >= 0)
                        close(s);
                } else {
                    p->a[slot] = c;
                    p->b[slot] = s;
                    pthread_mutex_lock(&p->mu);
                    p->accepted++;
                    pthread_mutex_unlock(&p->mu);
                }
            }
        }
        for (int k = 2; k < n; k++) {
            int i = idx[k];
            if (!fds[k].revents || p->a[i] < 0)
                continue;
            bool ok = fds[k].fd == p->a[i] ? pump(p->a[i], p->b[i]) : pump(p->b[i], p->a[i]);
            if (!ok)
                pair_close(p, i);
        }
    }
    return NULL;
}

amqpt_proxy *amqpt_proxy_start(const char *host, int port)
{
    amqpt_proxy *p = calloc(1, sizeof *p);
    assert_non_null(p);
    snprintf(p->host, sizeof p->host, "%s", host);
    p->port = port;
    for (int i = 0; i < PROXY_MAX; i++)
        p->a[i] = p->b[i] = -1;
    pthread_mutex_init(&p->mu, NULL);
    assert_int_equal(pipe(p->wake), 0);
    fcntl(p->wake[0], F_SETFL, O_NONBLOCK);
    fcntl(p->wake[1], F_SETFL, O_NONBLOCK);
    p->listen = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(p->listen >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(p->listen, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(p->listen, 16), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(p->listen, (struct sockaddr *)&a, &len), 0);
    p->lport = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&p->thread, NULL, proxy_main, p), 0);
    return p;
}

int amqpt_proxy_port(const amqpt_proxy *p)
{
    return p->lport;
}

static void proxy_set(amqpt_proxy *p, bool *field, bool v)
{
    pthread_mutex_lock(&p->mu);
    *field = v;
    pthread_mutex_unlock(&p->mu);
    char c = 1;
    ssize_t w = write(p->wake[1], &c, 1);
    (void)w;
}

void amqpt_proxy_freeze(amqpt_proxy *p, bool frozen)
{
    /* Thawing ends the connections that were cut off: like a partition, nothing sent
     * meanwhile arrives late. The peers see them closed and reconnect. Both flags change
     * under one lock: were `frozen` cleared first, the proxy thread could wake between the
     * two and forward the bytes held during the freeze (a late publish the broker would
     * take, so the test would see it twice). */
    pthread_mutex_lock(&p->mu);
    p->frozen = frozen;
    if (!frozen)
        p->cut = true;
    pthread_mutex_unlock(&p->mu);
    char c = 1;
    ssize_t w = write(p->wake[1], &c, 1);
    (void)w;
    if (frozen)
        return;
    for (int i = 0; i < 200; i++) {
        pthread_mutex_lock(&p->mu);
        bool pending = p->cut;
        pthread_mutex_unlock(&p->mu);
        if (!pending)
            return;
        usleep(5000);
    }
    fail_msg("the proxy did not cut its connections");
}

int amqpt_proxy_accepted(amqpt_proxy *p)
{
    pthread_mutex_lock(&p->mu);
    int n = p->accepted;
    pthread_mutex_unlock(&p->mu);
    return n;
}

void amqpt_proxy_stop(amqpt_proxy *p)
{
    if (!p)
        return;
    proxy_set(p, &p->stop, true);
    pthread_join(p->thread, NULL);
    for (int i = 0; i < PROXY_MAX; i++)
        if (p->a[i] >= 0)
            pair_close(p, i);
    close(p->listen);
    close(p->wake[0]);
    close(p->wake[1]);
    pthread_mutex_destroy(&p->mu);
    free(p);
}
