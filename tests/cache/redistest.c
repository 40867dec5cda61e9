/* redistest.c — shared set-up of the cache tests; see redistest.h. */
#include "redistest.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"

#define STACK_REDIS_PORT 56379 /* the local stack's: never ours */

static pid_t pid = -1;
static int port;
static bool paused;
static char dir[128];
static char password[64];
int rt_admin_db;

static int free_port(void)
{
    for (int tries = 0; tries < 20; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            return -1;
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof a;
        int p = -1;
        if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
            getsockname(fd, (struct sockaddr *)&a, &len) == 0)
            p = ntohs(a.sin_port);
        close(fd);
        if (p > 0 && p != STACK_REDIS_PORT)
            return p;
    }
    return -1;
}

static redisContext *admin_connect(int64_t wait_us)
{
    int64_t until = clock_mono_us() + wait_us;
    for (;;) {
        struct timeval tv = {1, 0};
        redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
        if (c && !c->err) {
            redisSetTimeout(c, tv);
            bool ok = true;
            if (password[0]) {
                redisReply *r = redisCommand(c, "AUTH %s", password);
                ok = r && r->type == REDIS_REPLY_STATUS;
                if (r)
                    freeReplyObject(r);
            }
            if (ok && rt_admin_db) {
                redisReply *r = redisCommand(c, "SELECT %d", rt_admin_db);
                ok = r && r->type == REDIS_REPLY_STATUS;
                if (r)
                    freeReplyObject(r);
            }
            if (ok) {
                redisReply *r = redisCommand(c, "PING");
                ok = r && r->type == REDIS_REPLY_STATUS;
                if (r)
                    freeReplyObject(r);
            }
            if (ok)
                return c;
        }
        if (c)
            redisFree(c);
        if (clock_mono_us() >= until)
            return NULL;
        rt_sleep_us(10 * MS);
    }
}

pid_t rt_spawn_server(const char *const *argv, const char *logpath)
{
    pid_t p = fork();
    if (p == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a crashed test */
        int fd = open(logpath, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    return p;
}

static int spawn(void)
{
    const char *server = getenv("ORDERD_TEST_REDIS_SERVER");
    if (!server || !*server)
        server = "redis-server";
    char portbuf[16], logpath[192];
    snprintf(portbuf, sizeof portbuf, "%d", port);
    snprintf(logpath, sizeof logpath, "%s/redis.log", dir);
    const char *argv[24] = {server, "--port",       portbuf, "--bind", "127.0.0.1", "--save",
                            "",     "--appendonly", "no",    "--dir",  dir,         "--daemonize",
                            "no"};
    int n = 13;
    if (password[0]) {
        argv[n++] = "--requirepass";
        argv[n++] = password;
    }
    argv[n] = NULL;
    pid_t p = rt_spawn_server(argv, logpath);
    if (p < 0)
        return -1;
    pid = p;
    paused = false;
    redisContext *c = admin_connect(10 * 1000 * MS);
    if (!c) {
        fprintf(stderr, "FAIL: %s did not answer on port %d (see %s)\n", server, port, logpath);
        rt_kill();
        return -1;
    }
    redisFree(c);
    return 0;
}

int rt_start(const char *pw)
{
    signal(SIGPIPE, SIG_IGN); /* as orderd does: hiredis writes with write(2) */
    /* A cache call that never returns is a failure, not a hang: SIGALRM kills the test
     * (and PR_SET_PDEATHSIG its redis-server). */
    alarm((unsigned)(60 * rt_slow()));
    snprintf(password, sizeof password, "%s", pw ? pw : "");
    snprintf(dir, sizeof dir, "/tmp/orderd-cache-test-XXXXXX");
    if (!mkdtemp(dir)) {
        fprintf(stderr, "FAIL: mkdtemp: %s\n", strerror(errno));
        return -1;
    }
    port = free_port();
    if (port < 0) {
        fprintf(stderr, "FAIL: no free port\n");
        return -1;
    }
    return spawn();
}

void rt_kill(void)
{
    if (pid <= 0)
        return;
    kill(pid, SIGKILL);
    if (paused)
        kill(pid, SIGCONT);
    waitpid(pid, NULL, 0);
    pid = -1;
    paused = false;
}

int rt_restart(void)
{
    rt_kill();
    return spawn();
}

void rt_stop(void)
{
    rt_kill();
    if (dir[0]) {
        char path[256];
        snprintf(path, sizeof path, "%s/redis.log", dir);
        unlink(path);
        snprintf(path, sizeof path, "%s/dump.rdb", dir);
        unlink(path);
        rmdir(dir);
        dir[0] = '\0';
    }
}

void rt_pause(void)
{
    if (pid > 0 && !paused) {
        kill(pid, SIGSTOP);
        paused = true;
    }
}

void rt_resume(void)
{
    if (pid > 0 && paused) {
        kill(pid, SIGCONT);
        paused = false;
    }
}

int rt_port(void)
{
    return port;
}

bool rt_running(void)
{
    return pid > 0 && !paused;
}

static redisReply *vcmd(const char *fmt, va_list ap)
{
    redisContext *c = admin_connect(2 * 1000 * MS);
    if (!c)
        return NULL;
    redisReply *r = redisvCommand(c, fmt, ap);
    redisFree(c);
    return r;
}

redisReply *rt_cmd(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = vcmd(fmt, ap);
    va_end(ap);
    return r;
}

long long rt_int(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = vcmd(fmt, ap);
    va_end(ap);
    long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    if (r)
        freeReplyObject(r);
    return v;
}

long long rt_cmdstat(const char *name)
{
    redisReply *r = rt_cmd("INFO commandstats");
    long long v = 0;
    if (r && r->type == REDIS_REPLY_STRING) {
        char needle[64];
        snprintf(needle, sizeof needle, "cmdstat_%s:calls=", name);
        const char *p = strstr(r->str, needle);
        if (p)
            v = strtoll(p + strlen(needle), NULL, 10);
    }
    if (r)
        freeReplyObject(r);
    return v;
}

cache_options rt_options(void)
{
    cache_options o = {
        .host = "127.0.0.1",
        .port = port,
        .password = password[0] ? password : NULL,
        .timeout_us = 100 * MS,
        .backoff_min_us = 20 * MS,
        .backoff_max_us = 200 * MS,
        .key_prefix = "t:",
        .order_ttl_us = 60 * 1000 * MS,
    };
    return o;
}

struct cache *rt_cache(const cache_options *o)
{
    char err[256] = "";
    struct cache *c = cache_open(o, err, sizeof err);
    if (!c) {
        fprintf(stderr, "FAIL: cache_open: %s\n", err);
        abort();
    }
    return c;
}

int64_t rt_slow(void)
{
    const char *s = getenv("ORDERD_TEST_SLOW");
    int64_t v = s ? strtoll(s, NULL, 10) : 1;
    return v >= 1 ? v : 1;
}

void rt_sleep_us(int64_t us)
{
    struct timespec ts = {.tv_sec = (time_t)(us / 1000000), .tv_nsec = (long)(us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* ---- the fake store ---- */

void fake_id(char out[ORDER_ID_LEN + 1], int n)
{
    snprintf(out, ORDER_ID_LEN + 1, "00000000-0000-4000-8000-%012d", n);
}

void fake_init(fake_store *f)
{
    memset(f, 0, sizeof *f);
    pthread_mutex_init(&f->mu, NULL);
}

void fake_destroy(fake_store *f)
{
    for (int i = 0; i < FAKE_MAX_ORDERS; i++)
        order_clear(&f->orders[i]);
    pthread_mutex_destroy(&f->mu);
}

static order_t *find(fake_store *f, const char *id)
{
    for (int i = 0; i < FAKE_MAX_ORDERS; i++)
        if (f->orders[i].id[0] && strcmp(f->orders[i].id, id) == 0)
            return &f->orders[i];
    return NULL;
}

static order_t *slot(fake_store *f, const char *id)
{
    order_t *o = find(f, id);
    if (o)
        return o;
    for (int i = 0; i < FAKE_MAX_ORDERS; i++)
        if (!f->orders[i].id[0])
            return &f->orders[i];
    /* Full: recycle the first slot (tests use few orders at a time). */
    order_clear(&f->orders[0]);
    return &f->orders[0];
}

static void fill_order(order_t *o, const char *id, const char *customer, int64_t version)
{
    order_clear(o);
    snprintf(o->id, sizeof o->id, "%s", id);
    snprintf(o->customer_id, sizeof o->customer_id, "%s", customer);
    o->status = ORDER_STATUS_PENDING;
    snprintf(o->currency, sizeof o->currency, "EUR");
    o->nitems = 2;
    o->items = calloc(2, sizeof *o->items);
    for (size_t i = 0; i < 2; i++) {
        snprintf(o->items[i].product_id, sizeof o->items[i].product_id, "p-%zu", i);
        snprintf(o->items[i].name, sizeof o->items[i].name, "product %zu", i);
        o->items[i].quantity = (int32_t)(i + 1);
        o->items[i].unit_price_minor = 250;
        o->items[i].line_total_minor = 250 * (int64_t)(i + 1);
    }
    o->subtotal_minor = 750;
    o->total_minor = 750;
    o->created_at_us = 1700000000000000LL;
    o->updated_at_us = o->created_at_us + version;
    o->version = version;
}

void fake_put(fake_store *f, const char *id, const char *customer, int64_t version)
{
    pthread_mutex_lock(&f->mu);
    fill_order(slot(f, id), id, customer, version);
    pthread_mutex_unlock(&f->mu);
}

static int f_order_get(void *self, order_ctx *ctx, const char *id, order_t *out)
{
    fake_store *f = self;
    atomic_fetch_add(&f->gets, 1);
    if (f->get_delay_us)
        rt_sleep_us(f->get_delay_us);
    pthread_mutex_lock(&f->mu);
    order_t *o = find(f, id);
    int rc = o ? order_copy(out, o) : order_fail(ctx->err, ORDER_ENOTFOUND, "no order %s", id);
    void (*hook)(void *) = f->get_hook;
    void *arg = f->hook_arg;
    f->get_hook = NULL;
    pthread_mutex_unlock(&f->mu);
    if (hook)
        hook(arg);
    return rc;
}

static int f_order_insert(void *self, order_ctx *ctx, const char *request_id,
                          const char *fingerprint, order_t *o, bool *replayed)
{
    fake_store *f = self;
    atomic_fetch_add(&f->inserts, 1);
    pthread_mutex_lock(&f->mu);
    fake_id(o->id, 1000000 + ++f->next_id);
    o->version = 1;
    o->status = ORDER_STATUS_PENDING;
    int rc = order_copy(slot(f, o->id), o);
    pthread_mutex_unlock(&f->mu);
    *replayed = false;
    return rc;
}

static int f_order_transition(void *self, order_ctx *ctx, const order_transition *t, order_t *out)
{
    fake_store *f = self;
    atomic_fetch_add(&f->transitions, 1);
    pthread_mutex_lock(&f->mu);
    int rc = ORDER_OK;
    order_t *o = find(f, t->order_id);
    if (f->fail_transition)
        rc = order_fail(ctx->err, f->fail_transition, "injected");
    else if (!o)
        rc = order_fail(ctx->err, ORDER_ENOTFOUND, "no order");
    else if (t->from_set && !(t->from_set & ORDER_STATUS_BIT(o->status))) {
        rc = order_fail(ctx->err, ORDER_EPRECONDITION, "status");
        ctx->err->current_status = (int)o->status;
        (void)order_copy(out, o);
    } else {
        o->status = t->to;
        o->version++;
        o->updated_at_us++;
        rc = order_copy(out, o);
    }
    pthread_mutex_unlock(&f->mu);
    return rc;
}

static void set_opt(char *dst, size_t cap, const char *v)
{
    if (v && *v)
        snprintf(dst, cap, "%s", v);
}

static int f_inbound_seen(void *self, order_ctx *ctx, const order_inbound *in, bool *seen)
{
    (void)self;
    (void)ctx;
    (void)in;
    *seen = false;
    return ORDER_OK;
}

static int f_order_amend(void *self, order_ctx *ctx, const order_amendment *a, order_t *out)
{
    fake_store *f = self;
    atomic_fetch_add(&f->amends, 1);
    pthread_mutex_lock(&f->mu);
    int rc = ORDER_OK;
    order_t *o = find(f, a->order_id);
    if (f->fail_transition) {
        rc = order_fail(ctx->err, f->fail_transition, "injected");
    } else if (!o) {
        rc = order_fail(ctx->err, ORDER_ENOTFOUND, "no order");
    } else if (a->pay_from_set && !(a->pay_from_set & ORDER_PAY_BIT(o->pay_status))) {
        rc = order_fail(ctx->err, ORDER_EPRECONDITION, "payment status");
        ctx->err->current_status = (int)o->status;
        (void)order_copy(out, o);
    } else {
        if (a->provider != ORDER_PROVIDER_UNSPECIFIED)
            o->pay_provider = a->provider;
        set_opt(o->pay_reference, sizeof o->pay_reference, a->reference);
        if (a->pay_status != ORDER_PAY_UNSPECIFIED)
            o->pay_status = a->pay_status;
        if (a->paid_at_us > 0)
            o->paid_at_us = a->paid_at_us;
        set_opt(o->pay_charge_id, sizeof o->pay_charge_id, a->charge_id);
        set_opt(o->pay_receipt_url, sizeof o->pay_receipt_url, a->receipt_url);
        set_opt(o->refund_id, sizeof o->refund_id, a->refund_id);
        if (a->refunded_at_us > 0)
            o->refunded_at_us = a->refunded_at_us;
        if (a->stock_reserved_at_us > 0)
            o->stock_reserved_at_us = a->stock_reserved_at_us;
        o->version++;
        o->updated_at_us++;
        rc = order_copy(out, o);
    }
    pthread_mutex_unlock(&f->mu);
    return rc;
}

static int f_order_find_by_payment(void *self, order_ctx *ctx, order_provider p, const char *ref,
                                   order_t *out)
{
    fake_store *f = self;
    atomic_fetch_add(&f->finds, 1);
    pthread_mutex_lock(&f->mu);
    int rc = order_fail(ctx->err, ORDER_ENOTFOUND, "no payment %s", ref ? ref : "");
    for (int i = 0; ref && *ref && i < FAKE_MAX_ORDERS; i++) {
        order_t *o = &f->orders[i];
        if (o->id[0] && o->pay_provider == p &&
            (strcmp(o->pay_reference, ref) == 0 || strcmp(o->pay_charge_id, ref) == 0)) {
            order_error_reset(ctx->err);
            rc = order_copy(out, o);
            break;
        }
    }
    pthread_mutex_unlock(&f->mu);
    return rc;
}

/* Copies of the orders `want` picks (at most max, 0 = 1), after applying `change` to each. */
static int f_pick(fake_store *f, order_ctx *ctx, bool (*want)(const order_t *, int64_t),
                  int64_t arg, void (*change)(order_t *, const char *), const char *reason,
                  size_t max, order_t **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    if (max == 0)
        max = 1;
    pthread_mutex_lock(&f->mu);
    order_t *res = calloc(FAKE_MAX_ORDERS, sizeof *res);
    int rc = res ? ORDER_OK : order_fail(ctx->err, ORDER_EINTERNAL, "out of memory");
    size_t m = 0;
    for (int i = 0; rc == ORDER_OK && i < FAKE_MAX_ORDERS && m < max; i++) {
        order_t *o = &f->orders[i];
        if (!o->id[0] || !want(o, arg))
            continue;
        if (change)
            change(o, reason);
        rc = order_copy(&res[m++], o);
    }
    pthread_mutex_unlock(&f->mu);
    if (rc != ORDER_OK || m == 0) {
        order_list_free(res, m);
        return rc;
    }
    *out = res;
    *n = m;
    return ORDER_OK;
}

static bool f_want_expiring(const order_t *o, int64_t created_before_us)
{
    return o->status == ORDER_STATUS_PENDING && o->created_at_us < created_before_us;
}

static void f_expire(order_t *o, const char *reason)
{
    o->status = ORDER_STATUS_EXPIRED;
    snprintf(o->cancel_reason, sizeof o->cancel_reason, "%s", reason ? reason : "");
    o->version++;
    o->updated_at_us++;
}

static bool f_want_unsettled(const order_t *o, int64_t changed_before_us)
{
    return (o->status == ORDER_STATUS_CANCELLED || o->status == ORDER_STATUS_EXPIRED ||
            o->status == ORDER_STATUS_FAILED) &&
           (o->pay_status == ORDER_PAY_PENDING || o->pay_status == ORDER_PAY_SUCCEEDED) &&
           o->updated_at_us < changed_before_us;
}

static int f_orders_expire_due(void *self, order_ctx *ctx, int64_t created_before_us,
                               const char *reason, size_t max, order_t **out, size_t *n)
{
    fake_store *f = self;
    atomic_fetch_add(&f->expiries, 1);
    return f_pick(f, ctx, f_want_expiring, created_before_us, f_expire, reason, max, out, n);
}

static int f_orders_unsettled(void *self, order_ctx *ctx, int64_t changed_before_us, size_t max,
                              order_t **out, size_t *n)
{
    fake_store *f = self;
    atomic_fetch_add(&f->unsettled, 1);
    return f_pick(f, ctx, f_want_unsettled, changed_before_us, NULL, NULL, max, out, n);
}

order_store fake_port(fake_store *f)
{
    order_store s = {
        .self = f,
        .order_insert = f_order_insert,
        .order_get = f_order_get,
        .order_transition = f_order_transition,
        .order_amend = f_order_amend,
        .inbound_seen = f_inbound_seen,
        .order_find_by_payment = f_order_find_by_payment,
        .orders_expire_due = f_orders_expire_due,
        .orders_unsettled = f_orders_unsettled,
    };
    return s;
}

/* ---- the codec ---- */

static const uint8_t MAGIC[4] = {'T', 'C', '0', '1'};

static uint8_t *t_encode(const order_t *o, size_t *len)
{
    size_t n = sizeof MAGIC + sizeof *o + o->nitems * sizeof *o->items;
    uint8_t *b = malloc(n);
    if (!b)
        return NULL;
    order_t head = *o;
    head.items = NULL;
    memcpy(b, MAGIC, sizeof MAGIC);
    memcpy(b + sizeof MAGIC, &head, sizeof head);
    if (o->nitems)
        memcpy(b + sizeof MAGIC + sizeof head, o->items, o->nitems * sizeof *o->items);
    *len = n;
    return b;
}

static bool t_decode(const uint8_t *b, size_t len, order_t *out)
{
    order_t head;
    if (len < sizeof MAGIC + sizeof head || memcmp(b, MAGIC, sizeof MAGIC) != 0)
        return false;
    memcpy(&head, b + sizeof MAGIC, sizeof head);
    if (head.nitems > ORDER_MAX_LINES ||
        len != sizeof MAGIC + sizeof head + head.nitems * sizeof *head.items)
        return false;
    *out = head;
    out->items = NULL;
    if (head.nitems) {
        out->items = malloc(head.nitems * sizeof *out->items);
        if (!out->items) {
            memset(out, 0, sizeof *out);
            return false;
        }
        memcpy(out->items, b + sizeof MAGIC + sizeof head, head.nitems * sizeof *out->items);
    }
    return true;
}

const cache_codec test_codec = {.encode = t_encode, .decode = t_decode};

order_ctx rt_ctx(order_error *e, int64_t deadline_us)
{
    order_error_reset(e);
    order_ctx ctx = {
        .deadline_mono_us = deadline_us > 0 ? clock_mono_us() + deadline_us : INT64_MAX, .err = e};
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "tester");
    ctx.caller.roles = ORDER_ROLE_ADMIN;
    return ctx;
}

order_transition rt_transition(const char *id, order_status to)
{
    order_transition t = {.order_id = id, .to = to, .expected_version = -1, .reason = "test"};
    return t;
}

int rt_setup_with_store(fake_store *fs)
{
    rt_resume();
    if (!rt_running() && rt_restart() != 0)
        return -1;
    fake_init(fs);
    return 0;
}
