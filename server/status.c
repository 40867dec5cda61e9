/* status.c — domain errors to gRPC statuses and google.rpc.Status details.
 *
 * The only place where domain codes become gRPC codes (ARCHITECTURE.md, Errors). Details
 * travel in the grpc-status-details-bin trailer as a serialized google.rpc.Status whose
 * `details` are Any-wrapped BadRequest, ErrorInfo and PreconditionFailure messages.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/rpc_status.h"
#include "google/rpc/error_details.pb-c.h"
#include "google/rpc/status.pb-c.h"
#include "server/internal.h"

#define ERROR_DOMAIN "orderd"

grpc_status_code srv_status_for(int code)
{
    switch (code) {
    case ORDER_OK:
        return GRPC_STATUS_OK;
    case ORDER_EINVAL:
        return GRPC_STATUS_INVALID_ARGUMENT;
    case ORDER_ENOTFOUND:
        return GRPC_STATUS_NOT_FOUND;
    case ORDER_EPERM:
        return GRPC_STATUS_PERMISSION_DENIED;
    case ORDER_EPRECONDITION:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case ORDER_EIDEMPOTENCY:
        return GRPC_STATUS_FAILED_PRECONDITION;
    case ORDER_EUNAVAILABLE:
        return GRPC_STATUS_UNAVAILABLE;
    case ORDER_EDEADLINE:
        return GRPC_STATUS_DEADLINE_EXCEEDED;
    case ORDER_EABORTED:
        return GRPC_STATUS_ABORTED;
    case ORDER_EDUPLICATE:
        return GRPC_STATUS_ALREADY_EXISTS;
    default:
        return GRPC_STATUS_INTERNAL;
    }
}

const char *srv_status_name(grpc_status_code code)
{
    return rpc_status_name((int)code);
}

/* Packs msg into an Any; the Any owns the packed bytes. */
static bool any_pack(Google__Protobuf__Any *any, const char *type, const ProtobufCMessage *msg)
{
    google__protobuf__any__init(any);
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf)
        return false;
    protobuf_c_message_pack(msg, buf);
    any->type_url = (char *)type;
    any->value.data = buf;
    any->value.len = n;
    return true;
}

/* Packs a google.rpc.Status holding anys[0..nany) and frees the Anys' packed bytes.
 * Returns the malloc'd bytes (NULL on allocation failure) and their length in *len. */
static uint8_t *status_pack(Google__Rpc__Status *st, Google__Protobuf__Any *anys, size_t nany,
                            size_t *len)
{
    Google__Protobuf__Any *ptrs[4];
    for (size_t i = 0; i < nany; i++)
        ptrs[i] = &anys[i];
    st->n_details = nany;
    st->details = nany ? ptrs : NULL;
    size_t n = google__rpc__status__get_packed_size(st);
    uint8_t *out = malloc(n ? n : 1);
    if (out) {
        google__rpc__status__pack(st, out);
        *len = n;
    } else {
        *len = 0;
    }
    for (size_t i = 0; i < nany; i++)
        free(anys[i].value.data);
    return out;
}

uint8_t *srv_status_details(grpc_status_code code, const char *message, const order_error *err,
                            const char *reason, size_t *len)
{
    Google__Rpc__Status st;
    google__rpc__status__init(&st);
    st.code = (int32_t)code;
    st.message = (char *)(message ? message : "");

    Google__Protobuf__Any anys[3];
    size_t nany = 0;

    /* BadRequest: every field violation, as the domain found them. */
    Google__Rpc__BadRequest br;
    Google__Rpc__BadRequest__FieldViolation *fv = NULL, **fvp = NULL;
    google__rpc__bad_request__init(&br);
    if (err && err->nviolations) {
        size_t n = err->nviolations;
        fv = calloc(n, sizeof *fv);
        fvp = calloc(n, sizeof *fvp);
        if (fv && fvp) {
            for (size_t i = 0; i < n; i++) {
                google__rpc__bad_request__field_violation__init(&fv[i]);
                fv[i].field = (char *)err->violations[i].field;
                fv[i].description = (char *)err->violations[i].description;
                fvp[i] = &fv[i];
            }
            br.n_field_violations = n;
            br.field_violations = fvp;
            if (any_pack(&anys[nany], "type.googleapis.com/google.rpc.BadRequest", &br.base))
                nany++;
        }
    }

    /* PreconditionFailure: which state stood in the way. */
    Google__Rpc__PreconditionFailure pf;
    Google__Rpc__PreconditionFailure__Violation pv, *pvp = &pv;
    char desc[96];
    google__rpc__precondition_failure__init(&pf);
    if (err && err->code == ORDER_EPRECONDITION && err->precondition_type[0]) {
        google__rpc__precondition_failure__violation__init(&pv);
        pv.type = (char *)err->precondition_type;
        pv.subject = (char *)err->precondition_subject;
        snprintf(desc, sizeof desc, "current status is %s",
                 order_status_enum_name(err->current_status));
        pv.description =
            strcmp(err->precondition_type, "ORDER_VERSION") == 0 ? (char *)err->message : desc;
        pf.n_violations = 1;
        pf.violations = &pvp;
        if (any_pack(&anys[nany], "type.googleapis.com/google.rpc.PreconditionFailure", &pf.base))
            nany++;
    }

    /* ErrorInfo: a machine-readable reason. */
    const char *why = reason;
    if (!why && err && err->reason[0])
        why = err->reason;
    if (!why && err && err->code == ORDER_EIDEMPOTENCY)
        why = "IDEMPOTENCY_KEY_REUSED";
    Google__Rpc__ErrorInfo ei;
    Google__Rpc__ErrorInfo__MetadataEntry me[1 + ORDER_ERROR_META_MAX];
    Google__Rpc__ErrorInfo__MetadataEntry *mep[1 + ORDER_ERROR_META_MAX];
    google__rpc__error_info__init(&ei);
    if (why) {
        ei.reason = (char *)why;
        ei.domain = (char *)ERROR_DOMAIN;
        ei.metadata = mep;
        if (err && err->current_status) {
            google__rpc__error_info__metadata_entry__init(&me[ei.n_metadata]);
            me[ei.n_metadata].key = (char *)"current_status";
            me[ei.n_metadata].value = (char *)order_status_enum_name(err->current_status);
            mep[ei.n_metadata] = &me[ei.n_metadata];
            ei.n_metadata++;
        }
        for (size_t i = 0; err && i < err->nmeta && i < ORDER_ERROR_META_MAX; i++) {
            google__rpc__error_info__metadata_entry__init(&me[ei.n_metadata]);
            me[ei.n_metadata].key = (char *)err->meta_key[i];
            me[ei.n_metadata].value = (char *)err->meta_value[i];
            mep[ei.n_metadata] = &me[ei.n_metadata];
            ei.n_metadata++;
        }
        if (any_pack(&anys[nany], "type.googleapis.com/google.rpc.ErrorInfo", &ei.base))
            nany++;
    }

    uint8_t *out = status_pack(&st, anys, nany, len);
    free(fv);
    free(fvp);
    return out;
}

uint8_t *srv_status_details_quota(const char *message, int64_t retry_after_us, const char *subject,
                                  const char *description, size_t *len)
{
    Google__Rpc__Status st;
    google__rpc__status__init(&st);
    st.code = GRPC_STATUS_RESOURCE_EXHAUSTED;
    st.message = (char *)(message ? message : "");

    /* RetryInfo: how long to wait; waiting that long and retrying succeeds. */
    Google__Protobuf__Duration delay;
    google__protobuf__duration__init(&delay);
    delay.seconds = retry_after_us / 1000000;
    delay.nanos = (int32_t)((retry_after_us % 1000000) * 1000);
    Google__Rpc__RetryInfo ri;
    google__rpc__retry_info__init(&ri);
    ri.retry_delay = &delay;

    /* QuotaFailure: whose budget, and what it is. */
    Google__Rpc__QuotaFailure__Violation v, *vp = &v;
    google__rpc__quota_failure__violation__init(&v);
    v.subject = (char *)subject;
    v.description = (char *)description;
    Google__Rpc__QuotaFailure qf;
    google__rpc__quota_failure__init(&qf);
    qf.n_violations = 1;
    qf.violations = &vp;

    Google__Protobuf__Any anys[2];
    size_t nany = 0;
    if (any_pack(&anys[nany], "type.googleapis.com/google.rpc.RetryInfo", &ri.base))
        nany++;
    if (any_pack(&anys[nany], "type.googleapis.com/google.rpc.QuotaFailure", &qf.base))
        nany++;
    return status_pack(&st, anys, nany, len);
}
