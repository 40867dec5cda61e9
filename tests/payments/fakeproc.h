/* fakeproc.h — the payment tests' link to a local fake provider (tests/fakes/fake_*.py): start
 * it as a child process on a free port, drive its control API (/_fake/...), read back the
 * requests it recorded, and stop it.
 *
 * The fakes live in the source tree: $ORDERD_REPO (set by tests/payments/CMakeLists.txt)
 * names its root. Responses of the control API are jansson values the caller frees with
 * json_decref(). */
#ifndef ORDERD_TESTS_PAYMENTS_FAKEPROC_H
#define ORDERD_TESTS_PAYMENTS_FAKEPROC_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "orders/orders.h"

typedef struct fakeproc {
    pid_t pid;
    int out_fd; /* its stdout, kept open so that it never writes into a closed pipe */
    int port;
    char base[64]; /* "http://127.0.0.1:<port>" */
} fakeproc;

/**
 * Starts `/usr/bin/python3 $ORDERD_REPO/<script> --port 0 <args...>` (args NULL-terminated)
 * and waits (at most 15 s) for its "LISTENING <port>" line. 0, or -1 with a message on
 * stderr. The child dies with the test process (PR_SET_PDEATHSIG).
 */
int fakeproc_start(fakeproc *f, const char *script, const char *const *args);
/** SIGTERM, then SIGKILL if it has not exited within 3 s. Safe on a stopped fake. */
void fakeproc_stop(fakeproc *f);

/**
 * Calls the fake's control API: method ("GET", "POST") on path ("/_fake/reset") with an
 * optional JSON body (printf-style; NULL = none). Returns the parsed answer (NULL if the
 * fake did not answer or did not answer JSON); *status gets the HTTP status if not NULL.
 */
json_t *fake_call(const fakeproc *f, const char *method, const char *path, long *status,
                  const char *body_fmt, ...) __attribute__((format(printf, 5, 6)));

/**
 * POSTs a form (already encoded: "a=1&b=2") to the fake's provider API as a merchant's own
 * code would, with "Authorization: Bearer <key>"; returns the parsed JSON answer (NULL if
 * none) and the HTTP status in *status if not NULL.
 */
json_t *fake_api_post(const fakeproc *f, const char *key, const char *path, const char *form,
                      long *status);

/** POST /_fake/reset; asserts success. */
void fake_reset(const fakeproc *f);
/** POST /_fake/fail {"mode": mode, "count": count, "path": path (NULL = any)}. */
void fake_fail(const fakeproc *f, const char *mode, int count, const char *path);
/** The recorded requests (GET /_fake/requests), whose path contains `path` (NULL = all)
 *  and whose method is `method` (NULL = any), as a new JSON array. */
json_t *fake_requests(const fakeproc *f, const char *method, const char *path);

/** A context with no deadline (deadline_us <= 0) or one deadline_us from now. */
order_ctx fake_ctx(order_error *e, int64_t deadline_us);
/** An order with a fresh random UUID, the currency and the total; status PENDING. */
void fake_order(order_t *o, const char *currency, int64_t total_minor);
/** The ErrorInfo metadata value for key in e, or NULL. */
const char *fake_meta(const order_error *e, const char *key);
/** CLOCK_MONOTONIC microseconds. */
int64_t fake_now_us(void);

#endif
