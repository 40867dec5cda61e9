/* rpc_status.c — names of the gRPC status codes (grpc/status.h numbering). */
#include "common/rpc_status.h"

static const char *const names[RPC_STATUS_MAX + 1] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *rpc_status_name(int code)
{
    return (code >= 0 && code <= RPC_STATUS_MAX) ? names[code] : "UNKNOWN";
}
