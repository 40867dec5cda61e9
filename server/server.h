/* server.h — the gRPC server of orderd: what main() needs to run it.
 *
 * srv_server_run builds the adapters from the configuration, starts the worker threads
 * and the gRPC server, and blocks until SIGINT or SIGTERM; then it drains in-flight calls
 * (up to server.shutdown_grace), stops everything it started and returns the exit code.
 * The caller must have blocked SIGINT and SIGTERM in every thread (pthread_sigmask)
 * BEFORE grpc_init(), so that the signals are only received by sigwait() here.
 */
#ifndef ORDERD_SERVER_SERVER_H
#define ORDERD_SERVER_SERVER_H

#include <signal.h>

#include "server/config.h"

/** Runs the server until one of the blocked signals in `wait_for` arrives. Returns 0 after
 *  a clean shutdown, non-zero if the server could not start. */
int srv_server_run(const srv_config *cfg, const sigset_t *wait_for);

#endif
