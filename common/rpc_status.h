/* rpc_status.h — names of the gRPC status codes, for logs and reports.
 * Kept free of gRPC headers so that any layer (and the bench client) can use it. */
#ifndef ORDERD_COMMON_RPC_STATUS_H
#define ORDERD_COMMON_RPC_STATUS_H

/** Highest gRPC status code (UNAUTHENTICATED). */
#define RPC_STATUS_MAX 16

/** The canonical name of a gRPC status code ("INVALID_ARGUMENT"); "UNKNOWN" outside 0..16. */
const char *rpc_status_name(int code);

#endif
