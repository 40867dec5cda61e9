/* live.c — see live.h. */
#include "live.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#define LIVE_MAX 4

static amqp_relay *live[LIVE_MAX];

amqp_relay *live_relay_start(const amqp_settings *s, const char *dsn, int64_t stmt_timeout_us)
{
    amqp_relay *r = NULL;
    char err[256] = "";
    if (amqp_relay_start(s, dsn, stmt_timeout_us, &r, err, sizeof err) != 0)
        fail_msg("amqp_relay_start: %s", err);
    for (size_t i = 0; i < LIVE_MAX; i++)
        if (!live[i]) {
            live[i] = r;
            return r;
        }
    fail_msg("more than %d relays at once", LIVE_MAX);
    return NULL;
}

void live_relay_stop(amqp_relay *r)
{
    for (size_t i = 0; i < LIVE_MAX; i++)
        if (live[i] == r)
            live[i] = NULL;
    amqp_relay_stop(r);
}

void live_relays_stop_all(void)
{
    for (size_t i = 0; i < LIVE_MAX; i++)
        if (live[i])
            live_relay_stop(live[i]);
}
