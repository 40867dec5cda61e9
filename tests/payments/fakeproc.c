/* fakeproc.c — start, drive and stop a local fake payment provider; see fakeproc.h. */
#define _GNU_SOURCE /* pipe2, vasprintf */
#include "fakeproc.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int64_t fake_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int fakeproc_start(fakeproc *f, const char *script, const char *const *args)
{
    memset(f, 0, sizeof *f);
    f->pid = -1;
    f->out_fd = -1;
    const char *repo = getenv("ORDERD_REPO");
    if (!repo || !*repo) {
        fprintf(stderr, "FAIL: ORDERD_REPO is not set (the root of the source tree)\n");
        return -1;
    }
    char path[512];
    snprintf(path, sizeof path, "%s/%s", repo, script);
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "FAIL: %s: %s\n", path, strerror(errno));
        return -1;
    }
    const char *argv[32] = {"/usr/bin/python3", path, "--port", "0"};
    int n = 4;
    for (; args && *args && n < 31; args++)
        argv[n++] = *args;
    argv[n] = NULL;

    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    signal(SIGPIPE, SIG_IGN);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a crashed test */
        dup2(fds[1], 1);
        setenv("PYTHONDONTWRITEBYTECODE", "1", 1); /* no __pycache__ in the source tree */
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    f->pid = pid;
    f->out_fd = fds[0];

    char line[128];
    size_t len = 0;
    int64_t until = fake_now_us() + 15 * 1000000LL;
    while (len < sizeof line - 1 && !memchr(line, '\n', len)) {
        struct pollfd p = {.fd = f->out_fd, .events = POLLIN};
        int64_t left = until - fake_now_us();
        if (left <= 0 || poll(&p, 1, (int)(left / 1000)) <= 0)
            break;
        ssize_t got = read(f->out_fd, line + len, sizeof line - 1 - len);
        if (got <= 0)
            break;
        len += (size_t)got;
    }
    line[len] = '\0';
    if (sscanf(line, "LISTENING %d", &f->port) != 1 || f->port <= 0) {
        fprintf(stderr, "FAIL: %s did not say LISTENING <port> (got \"%s\")\n", script, line);
        fakeproc_stop(f);
        return -1;
    }
    snprintf(f->base, sizeof f->base, "http://127.0.0.1:%d", f->port);
    return 0;
}

void fakeproc_stop(fakeproc *f)
{
    if (f->pid > 0) {
        kill(f->pid, SIGTERM);
        int64_t until = fake_now_us() + 3 * 1000000LL;
        while (waitpid(f->pid, NULL, WNOHANG) == 0) {
            if (fake_now_us() > until) {
                kill(f->pid, SIGKILL);
                waitpid(f->pid, NULL, 0);
                break;
            }
            usleep(20 * 1000);
        }
    }
    if (f->out_fd >= 0)
        close(f->out_fd);
    f->pid = -1;
    f->out_fd = -1;
}

typedef struct sink {
    char *data;
    size_t len;
} sink;

static size_t on_data(char *p, size_t size, size_t n, void *ud)
{
    sink *s = ud;
    char *d = realloc(s->data, s->len + size * n + 1);
    if (!d)
        return 0;
    memcpy(d + s->len, p, size * n);
    s->data = d;
    s->len += size * n;
    d[s->len] = '\0';
    return size * n;
}

/* One request to the fake: method on path with headers h (taken) and body (POST: NULL =
 * none); the parsed JSON answer, *status its HTTP status. */
static json_t *request(const fakeproc *f, const char *method, const char *path,
                       struct curl_slist *h, const char *body, long *status)
{
    char url[512];
    snprintf(url, sizeof url, "%s%s", f->base, path);
    CURL *c = curl_easy_init();
    sink s = {0};
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 10L);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &s);
    if (strcmp(method, "POST") == 0)
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body ? body : "");
    else if (strcmp(method, "GET") != 0)
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    long st = 0;
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &st);
    if (status)
        *status = st;
    json_t *out = s.data ? json_loads(s.data, 0, NULL) : NULL;
    free(s.data);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    return out;
}

json_t *fake_call(const fakeproc *f, const char *method, const char *path, long *status,
                  const char *body_fmt, ...)
{
    char *body = NULL;
    if (body_fmt) {
        va_list ap;
        va_start(ap, body_fmt);
        if (vasprintf(&body, body_fmt, ap) < 0)
            body = NULL;
        va_end(ap);
    }
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    json_t *out = request(f, method, path, h, body ? body : "{}", status);
    free(body);
    return out;
}

json_t *fake_api_post(const fakeproc *f, const char *key, const char *path, const char *form,
                      long *status)
{
    char auth[256];
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", key);
    struct curl_slist *h = curl_slist_append(NULL, auth);
    h = curl_slist_append(h, "Content-Type: application/x-www-form-urlencoded");
    return request(f, "POST", path, h, form, status);
}

void fake_reset(const fakeproc *f)
{
    long st = 0;
    json_decref(fake_call(f, "POST", "/_fake/reset", &st, NULL));
    if (st != 200) {
        fprintf(stderr, "FAIL: %s/_fake/reset answered %ld\n", f->base, st);
        abort();
    }
}

void fake_fail(const fakeproc *f, const char *mode, int count, const char *path)
{
    long st = 0;
    json_t *p = json_string(path ? path : "");
    char *ps = json_dumps(p, JSON_ENCODE_ANY);
    json_decref(fake_call(f, "POST", "/_fake/fail", &st,
                          "{\"mode\":\"%s\",\"count\":%d,\"path\":%s}", mode, count,
                          path ? ps : "null"));
    free(ps);
    json_decref(p);
    if (st != 200) {
        fprintf(stderr, "FAIL: %s/_fake/fail answered %ld\n", f->base, st);
        abort();
    }
}

json_t *fake_requests(const fakeproc *f, const char *method, const char *path)
{
    json_t *all = fake_call(f, "GET", "/_fake/requests", NULL, NULL);
    json_t *out = json_array();
    size_t i;
    json_t *r;
    json_array_foreach(all, i, r)
    {
        const char *m = json_string_value(json_object_get(r, "method"));
        const char *p = json_string_value(json_object_get(r, "path"));
        if (method && (!m || strcmp(m, method) != 0))
            continue;
        if (path && (!p || !strstr(p, path)))
            continue;
        json_array_append(out, r);
    }
    json_decref(all);
    return out;
}

order_ctx fake_ctx(order_error *e, int64_t deadline_us)
{
    order_error_reset(e);
    order_ctx ctx = {.deadline_mono_us = INT64_MAX, .err = e};
    snprintf(ctx.caller.subject, sizeof ctx.caller.subject, "svc-test");
    ctx.caller.roles = ORDER_ROLE_SERVICE;
    if (deadline_us > 0)
        ctx.deadline_mono_us = fake_now_us() + deadline_us;
    return ctx;
}

void fake_order(order_t *o, const char *currency, int64_t total_minor)
{
    unsigned char r[16];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r)
        abort();
    r[6] = (unsigned char)((r[6] & 0x0f) | 0x40);
    r[8] = (unsigned char)((r[8] & 0x3f) | 0x80);
    memset(o, 0, sizeof *o);
    snprintf(o->id, sizeof o->id,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", r[0], r[1],
             r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13], r[14],
             r[15]);
    snprintf(o->customer_id, sizeof o->customer_id, "cust-1");
    snprintf(o->currency, sizeof o->currency, "%s", currency);
    o->status = ORDER_STATUS_PENDING;
    o->subtotal_minor = total_minor;
    o->total_minor = total_minor;
    o->version = 1;
}

const char *fake_meta(const order_error *e, const char *key)
{
    for (size_t i = 0; i < e->nmeta && i < ORDER_ERROR_META_MAX; i++)
        if (strcmp(e->meta_key[i], key) == 0)
            return e->meta_value[i];
    return NULL;
}
