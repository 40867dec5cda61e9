/* live.h — relays started by an amqp test, tracked so that teardown can stop the ones a
 * failed assertion left running (cmocka jumps straight to teardown): a failing test must
 * not leave a relay publishing the next test's outbox rows. */
#ifndef ORDERD_TESTS_AMQP_LIVE_H
#define ORDERD_TESTS_AMQP_LIVE_H

#include <stdint.h>

#include "amqp/amqp.h"

/** amqp_relay_start, or the test fails; the relay is tracked until live_relay_stop. */
amqp_relay *live_relay_start(const amqp_settings *s, const char *dsn, int64_t stmt_timeout_us);
/** Stops a relay and forgets it. */
void live_relay_stop(amqp_relay *r);
/** Stops every relay still tracked (teardown). */
void live_relays_stop_all(void);

#endif
