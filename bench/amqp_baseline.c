/* amqp_baseline.c — the bare broker work of the outbox relay, with no PostgreSQL: the
 * baseline bench/relay.sh divides the relay's drain rate by (bench/README.md).
 *
 *   amqp-baseline publish --exchange X --messages N --batch B --message KEY=FILE [...] [--json]
 *   amqp-baseline declare --exchange X --bind QUEUE=PATTERN [...]
 *   amqp-baseline purge   --queue Q [...]        (prints "Q <messages purged>")
 *   amqp-baseline count   --queue Q [...]        (prints "Q <messages ready>", passive)
 *   amqp-baseline teardown [--queue Q ...] [--delete-exchange X ...]
 * Connection: --host (127.0.0.1) --port (5672) --vhost (/) --user (guest); the password
 * from the environment variable AMQP_PASSWORD (guest when unset).
 *
 * publish does what amqp/relay.c does for one claimed batch, with messages made up instead
 * of outbox rows: on one connection and channel in confirm mode it publishes B messages
 * (persistent, mandatory, the relay's properties: content_type, delivery_mode 2, a fresh
 * UUID message_id, type = routing key, timestamp, app_id "orderd", an order_id header),
 * then reads frames until every delivery tag of the batch is acked or nacked (multiple or
 * not; a basic.return's content is read and the message counted as returned), and starts
 * the next batch; N messages in all. The --message KEY=FILE bodies (file contents, one
 * trailing newline dropped) are used round robin with their routing keys: bench/relay.sh
 * passes a stock.reserve and an order.placed body taken from the outbox, the two events
 * PlaceOrder writes. Time is taken from the first publish to the last confirm; steady_rate
 * leaves out the first batch, as the relay's steady rate leaves out its first round.
 * Exit status 1 when a message was nacked, returned or not confirmed; 2 for usage or
 * connection errors.
 */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <time.h>

#define MAX_ITEMS 16
#define TIMEOUT_S 5 /* every broker call and every batch's confirm wait, as amqp.timeout */

struct message {
    char key[256];
    char *body;
    size_t len;
};

static struct opts {
    const char *host, *vhost, *user, *password, *exchange;
    int port;
    long messages, batch;
    bool json;
    struct message msg[MAX_ITEMS];
    int nmsg;
    const char *queue[MAX_ITEMS];
    int nqueue;
    const char *bind_q[MAX_ITEMS], *bind_p[MAX_ITEMS];
    int nbind;
    const char *del_x[MAX_ITEMS];
    int ndel_x;
} O = {.host = "127.0.0.1", .vhost = "/", .user = "guest", .port = 5672, .batch = 100};

static amqp_connection_state_t st;
static const amqp_channel_t CH = 1;

static void die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("amqp-baseline: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void reply_check(amqp_rpc_reply_t r, const char *what)
{
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return;
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
        die(2, "%s: %s", what, amqp_error_string2(r.library_error));
    if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION) {
        if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            const amqp_channel_close_t *m = r.reply.decoded;
            die(2, "%s: channel closed by the broker: %u %.*s", what, m->reply_code,
                (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        }
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            const amqp_connection_close_t *m = r.reply.decoded;
            die(2, "%s: connection closed by the broker: %u %.*s", what, m->reply_code,
                (int)m->reply_text.len, (const char *)m->reply_text.bytes);
        }
    }
    die(2, "%s: failed", what);
}

static void open_channel(void)
{
    st = amqp_new_connection();
    amqp_socket_t *sock = st ? amqp_tcp_socket_new(st) : NULL;
    if (!sock)
        die(2, "out of memory");
    struct timeval tv = {.tv_sec = TIMEOUT_S};
    int rc = amqp_socket_open_noblock(sock, O.host, O.port, &tv);
    if (rc != AMQP_STATUS_OK)
        die(2, "connect to %s:%d: %s", O.host, O.port, amqp_error_string2(rc));
    amqp_set_handshake_timeout(st, &tv);
    amqp_set_rpc_timeout(st, &tv);
    reply_check(amqp_login(st, O.vhost, 0, AMQP_DEFAULT_FRAME_SIZE, 0, AMQP_SASL_METHOD_PLAIN,
                           O.user, O.password),
                "login");
    amqp_channel_open(st, CH);
    reply_check(amqp_get_rpc_reply(st), "channel.open");
}

static void close_channel(void)
{
    amqp_channel_close(st, CH, AMQP_REPLY_SUCCESS);
    amqp_connection_close(st, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(st);
}

/* ---- publish ---------------------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static void uuid4(char out[37])
{
    unsigned char b[16];
    uint64_t a = rng(), c = rng();
    memcpy(b, &a, 8);
    memcpy(b + 8, &c, 8);
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    static const char hex[] = "0123456789abcdef";
    int k = 0;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[k++] = '-';
        out[k++] = hex[b[i] >> 4];
        out[k++] = hex[b[i] & 15];
    }
    out[k] = '\0';
}

enum { S_WAIT, S_ACK, S_NACK };

struct pending {
    uint64_t tag;
    int state;
};

static void settle(struct pending *p, long n, uint64_t tag, bool multiple, int state, long *waiting)
{
    for (long i = 0; i < n; i++) {
        if (p[i].state != S_WAIT)
            continue;
        if (p[i].tag == tag || (multiple && p[i].tag < tag)) {
            p[i].state = state;
            (*waiting)--;
        }
    }
}

/* The content of a basic.return: its header and body frames. */
static void skip_content(double deadline)
{
    amqp_frame_t f;
    uint64_t size = 0, got = 0;
    bool header = false;
    while (!header || got < size) {
        double left = deadline - now_s();
        struct timeval tv = {.tv_sec = left > 0 ? (time_t)left : 0,
                             .tv_usec =
                                 left > 0 ? (suseconds_t)((left - (double)(time_t)left) * 1e6) : 0};
        int rc = amqp_simple_wait_frame_noblock(st, &f, &tv);
        if (rc != AMQP_STATUS_OK)
            die(2, "reading a returned message: %s", amqp_error_string2(rc));
        if (f.frame_type == AMQP_FRAME_HEADER) {
            header = true;
            size = f.payload.properties.body_size;
        } else if (f.frame_type == AMQP_FRAME_BODY) {
            got += f.payload.body_fragment.len;
        } else {
            die(2, "reading a returned message: unexpected frame type %u", (unsigned)f.frame_type);
        }
    }
}

static int cmd_publish(void)
{
    if (!O.exchange || O.messages <= 0 || O.batch <= 0 || O.nmsg == 0)
        die(2, "publish needs --exchange, --messages N, --batch B and at least one --message "
               "KEY=FILE");
    if (getrandom(&rng_state, sizeof rng_state, 0) != sizeof rng_state || rng_state == 0)
        rng_state = 0x9E3779B97F4A7C15ull;
    open_channel();
    amqp_confirm_select(st, CH);
    reply_check(amqp_get_rpc_reply(st), "confirm.select");

    struct pending *p = calloc((size_t)O.batch, sizeof *p);
    if (!p)
        die(2, "out of memory");
    uint64_t next_tag = 1;
    long sent = 0, acked = 0, nacked = 0, returned = 0, unconfirmed = 0, batches = 0;
    size_t body_bytes = 0;
    double cpu0 = cpu_s(), t0 = now_s(), t_first = 0, t_end = 0;
    while (sent < O.messages) {
        long n = O.messages - sent < O.batch ? O.messages - sent : O.batch;
        long waiting = 0;
        for (long i = 0; i < n; i++) {
            const struct message *m = &O.msg[(sent + i) % O.nmsg];
            char id[37], order_id[37];
            uuid4(id);
            uuid4(order_id);
            amqp_table_entry_t h = {.key = amqp_cstring_bytes("order_id")};
            h.value.kind = AMQP_FIELD_KIND_UTF8;
            h.value.value.bytes = amqp_cstring_bytes(order_id);
            amqp_basic_properties_t props = {0};
            props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
                           AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_TYPE_FLAG |
                           AMQP_BASIC_TIMESTAMP_FLAG | AMQP_BASIC_HEADERS_FLAG |
                           AMQP_BASIC_APP_ID_FLAG;
            props.content_type = amqp_cstring_bytes("application/json");
            props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
            props.message_id = amqp_cstring_bytes(id);
            props.type = amqp_cstring_bytes(m->key);
            props.timestamp = (uint64_t)time(NULL);
            props.app_id = amqp_cstring_bytes("orderd");
            props.headers.num_entries = 1;
            props.headers.entries = &h;
            amqp_bytes_t body = {.len = m->len, .bytes = m->body};
            int rc = amqp_basic_publish(st, CH, amqp_cstring_bytes(O.exchange),
                                        amqp_cstring_bytes(m->key), 1, 0, &props, body);
            if (rc != AMQP_STATUS_OK)
                die(2, "publish: %s", amqp_error_string2(rc));
            body_bytes += m->len;
            p[i] = (struct pending){.tag = next_tag++, .state = S_WAIT};
            waiting++;
        }
        double deadline = now_s() + TIMEOUT_S;
        while (waiting > 0) {
            double left = deadline - now_s();
            if (left <= 0)
                break;
            struct timeval tv = {.tv_sec = (time_t)left,
                                 .tv_usec = (suseconds_t)((left - (double)(time_t)left) * 1e6)};
            amqp_frame_t f;
            int rc = amqp_simple_wait_frame_noblock(st, &f, &tv);
            if (rc == AMQP_STATUS_TIMEOUT)
                break;
            if (rc != AMQP_STATUS_OK)
                die(2, "waiting for confirms: %s", amqp_error_string2(rc));
            if (f.frame_type != AMQP_FRAME_METHOD)
                continue;
            switch (f.payload.method.id) {
            case AMQP_BASIC_ACK_METHOD: {
                const amqp_basic_ack_t *a = f.payload.method.decoded;
                settle(p, n, a->delivery_tag, a->multiple, S_ACK, &waiting);
                break;
            }
            case AMQP_BASIC_NACK_METHOD: {
                const amqp_basic_nack_t *a = f.payload.method.decoded;
                settle(p, n, a->delivery_tag, a->multiple, S_NACK, &waiting);
                break;
            }
            case AMQP_BASIC_RETURN_METHOD:
                returned++;
                skip_content(deadline);
                break;
            case AMQP_CHANNEL_CLOSE_METHOD:
            case AMQP_CONNECTION_CLOSE_METHOD:
                die(2, "the broker closed the channel or connection while confirming");
                break;
            default:
                break;
            }
            amqp_maybe_release_buffers(st);
        }
        for (long i = 0; i < n; i++) {
            if (p[i].state == S_ACK)
                acked++;
            else if (p[i].state == S_NACK)
                nacked++;
            else
                unconfirmed++;
        }
        sent += n;
        batches++;
        t_end = now_s();
        if (batches == 1)
            t_first = t_end;
        if (unconfirmed)
            break; /* as the relay: a missing confirm ends the connection */
    }
    double elapsed = t_end - t0, cpu = cpu_s() - cpu0;
    long first = O.messages < O.batch ? O.messages : O.batch;
    double steady = batches > 1 && t_end > t_first ? (double)(sent - first) / (t_end - t_first) : 0;
    if (O.json)
        printf("{\"messages\":%ld,\"batch\":%ld,\"batches\":%ld,\"acked\":%ld,\"nacked\":%ld,"
               "\"returned\":%ld,\"unconfirmed\":%ld,\"body_bytes_mean\":%.1f,\"elapsed_s\":%.6f,"
               "\"rate\":%.1f,\"steady_s\":%.6f,\"steady_rate\":%.1f,\"cpu_s\":%.4f}\n",
               sent, O.batch, batches, acked, nacked, returned, unconfirmed,
               sent ? (double)body_bytes / (double)sent : 0, elapsed,
               elapsed > 0 ? (double)sent / elapsed : 0, t_end - t_first, steady, cpu);
    else
        printf("%ld messages in %ld batches of %ld: %.3f s, %.0f msg/s (after the first batch: "
               "%.0f msg/s); acked %ld, nacked %ld, returned %ld, unconfirmed %ld; CPU %.3f s\n",
               sent, batches, O.batch, elapsed, elapsed > 0 ? (double)sent / elapsed : 0, steady,
               acked, nacked, returned, unconfirmed, cpu);
    free(p);
    close_channel();
    return nacked || returned || unconfirmed || acked != O.messages ? 1 : 0;
}

/* ---- topology ---------------------------------------------------------------------------- */

/* As orderd declares them: a durable topic exchange, durable classic queues. */
static int cmd_declare(void)
{
    if (!O.exchange)
        die(2, "declare needs --exchange");
    open_channel();
    amqp_exchange_declare(st, CH, amqp_cstring_bytes(O.exchange), amqp_cstring_bytes("topic"), 0, 1,
                          0, 0, amqp_empty_table);
    reply_check(amqp_get_rpc_reply(st), "exchange.declare");
    for (int i = 0; i < O.nbind; i++) {
        amqp_queue_declare(st, CH, amqp_cstring_bytes(O.bind_q[i]), 0, 1, 0, 0, amqp_empty_table);
        reply_check(amqp_get_rpc_reply(st), "queue.declare");
        amqp_queue_bind(st, CH, amqp_cstring_bytes(O.bind_q[i]), amqp_cstring_bytes(O.exchange),
                        amqp_cstring_bytes(O.bind_p[i]), amqp_empty_table);
        reply_check(amqp_get_rpc_reply(st), "queue.bind");
    }
    close_channel();
    return 0;
}

/* count: passive declare (a missing queue closes the channel: reopen and say -1). */
static int cmd_queues(bool purge)
{
    if (O.nqueue == 0)
        die(2, "%s needs --queue", purge ? "purge" : "count");
    open_channel();
    for (int i = 0; i < O.nqueue; i++) {
        long n;
        if (purge) {
            amqp_queue_purge_ok_t *ok = amqp_queue_purge(st, CH, amqp_cstring_bytes(O.queue[i]));
            amqp_rpc_reply_t r = amqp_get_rpc_reply(st);
            if (r.reply_type != AMQP_RESPONSE_NORMAL || !ok) {
                close_channel();
                die(2, "purge %s failed (does it exist?)", O.queue[i]);
            }
            n = (long)ok->message_count;
        } else {
            amqp_queue_declare_ok_t *ok = amqp_queue_declare(st, CH, amqp_cstring_bytes(O.queue[i]),
                                                             1, 0, 0, 0, amqp_empty_table);
            amqp_rpc_reply_t r = amqp_get_rpc_reply(st);
            if (r.reply_type != AMQP_RESPONSE_NORMAL || !ok) {
                amqp_destroy_connection(st);
                open_channel();
                n = -1;
            } else {
                n = (long)ok->message_count;
            }
        }
        printf("%s %ld\n", O.queue[i], n);
    }
    close_channel();
    return 0;
}

/* teardown: queue.delete / exchange.delete, unconditional (deleting what is not there is
 * not an error in RabbitMQ 3.x). */
static int cmd_teardown(void)
{
    open_channel();
    for (int i = 0; i < O.nqueue; i++) {
        amqp_queue_delete_ok_t *ok =
            amqp_queue_delete(st, CH, amqp_cstring_bytes(O.queue[i]), 0, 0);
        reply_check(amqp_get_rpc_reply(st), "queue.delete");
        printf("queue %s deleted (%u messages)\n", O.queue[i], ok ? ok->message_count : 0);
    }
    for (int i = 0; i < O.ndel_x; i++) {
        amqp_exchange_delete(st, CH, amqp_cstring_bytes(O.del_x[i]), 0);
        reply_check(amqp_get_rpc_reply(st), "exchange.delete");
        printf("exchange %s deleted\n", O.del_x[i]);
    }
    close_channel();
    return 0;
}

/* ---- arguments --------------------------------------------------------------------------- */

static void read_message(const char *arg)
{
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg || (size_t)(eq - arg) >= sizeof O.msg[0].key || O.nmsg == MAX_ITEMS)
        die(2, "--message wants KEY=FILE (at most %d)", MAX_ITEMS);
    struct message *m = &O.msg[O.nmsg++];
    memcpy(m->key, arg, (size_t)(eq - arg));
    m->key[eq - arg] = '\0';
    FILE *f = fopen(eq + 1, "rb");
    if (!f)
        die(2, "%s: %s", eq + 1, strerror(errno));
    size_t cap = 4096;
    m->body = malloc(cap);
    while (m->body) {
        size_t got = fread(m->body + m->len, 1, cap - m->len, f);
        m->len += got;
        if (m->len < cap)
            break;
        cap *= 2;
        m->body = realloc(m->body, cap);
    }
    if (!m->body)
        die(2, "out of memory");
    fclose(f);
    if (m->len && m->body[m->len - 1] == '\n')
        m->len--;
    if (m->len == 0)
        die(2, "%s is empty", eq + 1);
}

static long num(const char *v, const char *name)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *end || n <= 0)
        die(2, "%s wants a positive number", name);
    return n;
}

static void usage(void)
{
    fputs("usage: amqp-baseline publish|declare|purge|count|teardown [options]\n"
          "  --host H --port P --vhost V --user U   the broker (password: AMQP_PASSWORD, "
          "default guest)\n"
          "  --exchange X                           publish, declare\n"
          "  --messages N --batch B                 publish: N messages, B per confirm wait\n"
          "  --message KEY=FILE                     publish: a routing key and its body "
          "(repeatable: round robin)\n"
          "  --json                                 publish: one JSON line\n"
          "  --bind QUEUE=PATTERN                   declare: a durable queue and its binding\n"
          "  --queue Q                              purge, count, teardown (repeatable)\n"
          "  --delete-exchange X                    teardown (repeatable)\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *cmd = argv[1];
    O.password = getenv("AMQP_PASSWORD");
    if (!O.password || !*O.password)
        O.password = "guest";
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--json") == 0) {
            O.json = true;
            continue;
        }
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (strcmp(a, "--host") == 0)
            O.host = v;
        else if (strcmp(a, "--port") == 0)
            O.port = (int)num(v, a);
        else if (strcmp(a, "--vhost") == 0)
            O.vhost = v;
        else if (strcmp(a, "--user") == 0)
            O.user = v;
        else if (strcmp(a, "--exchange") == 0)
            O.exchange = v;
        else if (strcmp(a, "--messages") == 0)
            O.messages = num(v, a);
        else if (strcmp(a, "--batch") == 0)
            O.batch = num(v, a);
        else if (strcmp(a, "--message") == 0)
            read_message(v);
        else if (strcmp(a, "--queue") == 0 && O.nqueue < MAX_ITEMS)
            O.queue[O.nqueue++] = v;
        else if (strcmp(a, "--delete-exchange") == 0 && O.ndel_x < MAX_ITEMS)
            O.del_x[O.ndel_x++] = v;
        else if (strcmp(a, "--bind") == 0 && O.nbind < MAX_ITEMS) {
            const char *eq = strchr(v, '=');
            if (!eq || eq == v || !eq[1])
                die(2, "--bind wants QUEUE=PATTERN");
            O.bind_q[O.nbind] = strndup(v, (size_t)(eq - v));
            O.bind_p[O.nbind++] = eq + 1;
        } else
            usage();
    }
    if (strcmp(cmd, "publish") == 0)
        return cmd_publish();
    if (strcmp(cmd, "declare") == 0)
        return cmd_declare();
    if (strcmp(cmd, "purge") == 0)
        return cmd_queues(true);
    if (strcmp(cmd, "count") == 0)
        return cmd_queues(false);
    if (strcmp(cmd, "teardown") == 0)
        return cmd_teardown();
    usage();
    return 2;
}
