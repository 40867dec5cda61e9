/* reflection.c — gRPC server reflection (grpc.reflection.v1 and v1alpha), so that
 * `grpcurl -plaintext 127.0.0.1:50051 list` and `describe` work without .proto files.
 *
 * DESIGN
 * The build embeds a FileDescriptorSet of every file the server serves, with its imports
 * (protoc --include_imports; see CMakeLists.txt). At start-up it is indexed once: each
 * file's exact serialized bytes, its dependencies, and every fully-qualified symbol it
 * defines (messages, fields, enums, enum values, services, methods). The index is
 * read-only afterwards, so workers share it without locks. v1 and v1alpha have the same
 * wire format, so one handler serves both.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "google/protobuf/descriptor.pb-c.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "server/internal.h"

extern const unsigned char srv_descriptor_set[];
extern const size_t srv_descriptor_set_len;

typedef struct refl_file {
    const char *name;
    const uint8_t *bytes; /* into srv_descriptor_set */
    size_t len;
    Google__Protobuf__FileDescriptorProto *fd;
    size_t ndeps;
    int *deps; /* indices into files[] */
} refl_file;

typedef struct refl_symbol {
    char *name;
    int file;
} refl_symbol;

static struct {
    refl_file *files;
    size_t nfiles;
    refl_symbol *symbols;
    size_t nsymbols, capsymbols;
    char **services;
    size_t nservices;
} ix;

static bool add_symbol(const char *prefix, const char *name, int file)
{
    if (ix.nsymbols == ix.capsymbols) {
        size_t cap = ix.capsymbols ? ix.capsymbols * 2 : 256;
        refl_symbol *s = realloc(ix.symbols, cap * sizeof *s);
        if (!s)
            return false;
        ix.symbols = s;
        ix.capsymbols = cap;
    }
    size_t n = strlen(prefix) + strlen(name) + 2;
    char *full = malloc(n);
    if (!full)
        return false;
    snprintf(full, n, "%s%s%s", prefix, prefix[0] ? "." : "", name);
    ix.symbols[ix.nsymbols++] = (refl_symbol){full, file};
    return true;
}

static bool index_enum(const char *prefix, const Google__Protobuf__EnumDescriptorProto *e, int f)
{
    if (!add_symbol(prefix, e->name, f))
        return false;
    /* Enum values live in the enum's enclosing scope, as in protobuf's own pools. */
    for (size_t i = 0; i < e->n_value; i++)
        if (!add_symbol(prefix, e->value[i]->name, f))
            return false;
    return true;
}

static bool index_message(const char *prefix, const Google__Protobuf__DescriptorProto *m, int f)
{
    if (!add_symbol(prefix, m->name, f))
        return false;
    const char *full = ix.symbols[ix.nsymbols - 1].name;
    char *scope = strdup(full);
    if (!scope)
        return false;
    bool ok = true;
    for (size_t i = 0; ok && i < m->n_field; i++)
        ok = add_symbol(scope, m->field[i]->name, f);
    for (size_t i = 0; ok && i < m->n_nested_type; i++)
        ok = index_message(scope, m->nested_type[i], f);
    for (size_t i = 0; ok && i < m->n_enum_type; i++)
        ok = index_enum(scope, m->enum_type[i], f);
    free(scope);
    return ok;
}

static int file_index(const char *name)
{
    for (size_t i = 0; i < ix.nfiles; i++)
        if (strcmp(ix.files[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* Reads a base-128 varint; returns bytes used or 0 on malformed input. */
static size_t varint(const uint8_t *p, size_t n, uint64_t *out)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n && i < 10; i++) {
        v |= (uint64_t)(p[i] & 0x7f) << (7 * i);
        if (!(p[i] & 0x80)) {
            *out = v;
            return i + 1;
        }
    }
    return 0;
}

int srv_reflection_init(char *err, size_t errlen)
{
    /* FileDescriptorSet is `repeated FileDescriptorProto file = 1;`: walk the wire format
     * to keep each file's exact bytes, and unpack each one to index it. */
    const uint8_t *p = srv_descriptor_set;
    size_t n = srv_descriptor_set_len;
    size_t cap = 0;
    while (n > 0) {
        uint64_t key, len;
        size_t k = varint(p, n, &key);
        if (!k || key != ((1 << 3) | 2))
            goto bad;
        p += k, n -= k;
        k = varint(p, n, &len);
        if (!k || len > n - k)
            goto bad;
        p += k, n -= k;
        if (ix.nfiles == cap) {
            cap = cap ? cap * 2 : 16;
            refl_file *nf = realloc(ix.files, cap * sizeof *nf);
            if (!nf)
                goto oom;
            ix.files = nf;
        }
        refl_file *f = &ix.files[ix.nfiles];
        memset(f, 0, sizeof *f);
        f->bytes = p;
        f->len = (size_t)len;
        f->fd = google__protobuf__file_descriptor_proto__unpack(NULL, f->len, f->bytes);
        if (!f->fd || !f->fd->name)
            goto bad;
        f->name = f->fd->name;
        ix.nfiles++;
        p += len, n -= len;
    }
    for (size_t i = 0; i < ix.nfiles; i++) {
        refl_file *f = &ix.files[i];
        Google__Protobuf__FileDescriptorProto *fd = f->fd;
        const char *pkg = fd->package ? fd->package : "";
        f->deps = calloc(fd->n_dependency ? fd->n_dependency : 1, sizeof *f->deps);
        if (!f->deps)
            goto oom;
        for (size_t d = 0; d < fd->n_dependency; d++) {
            int di = file_index(fd->dependency[d]);
            if (di < 0) {
                snprintf(err, errlen, "descriptor set lacks %s, needed by %s", fd->dependency[d],
                         f->name);
                return -1;
            }
            f->deps[f->ndeps++] = di;
        }
        for (size_t m = 0; m < fd->n_message_type; m++)
            if (!index_message(pkg, fd->message_type[m], (int)i))
                goto oom;
        for (size_t e = 0; e < fd->n_enum_type; e++)
            if (!index_enum(pkg, fd->enum_type[e], (int)i))
                goto oom;
        for (size_t s = 0; s < fd->n_service; s++) {
            Google__Protobuf__ServiceDescriptorProto *svc = fd->service[s];
            if (!add_symbol(pkg, svc->name, (int)i))
                goto oom;
            char *svc_full = strdup(ix.symbols[ix.nsymbols - 1].name);
            char **ns = realloc(ix.services, (ix.nservices + 1) * sizeof *ns);
            if (!svc_full || !ns) {
                free(svc_full);
                goto oom;
            }
            ix.services = ns;
            ix.services[ix.nservices++] = svc_full;
            for (size_t m = 0; m < svc->n_method; m++)
                if (!add_symbol(svc_full, svc->method[m]->name, (int)i))
                    goto oom;
        }
    }
    return 0;
bad:
    snprintf(err, errlen, "the embedded descriptor set is malformed");
    return -1;
oom:
    snprintf(err, errlen, "out of memory");
    return -1;
}

void srv_reflection_dispose(void)
{
    for (size_t i = 0; i < ix.nfiles; i++) {
        google__protobuf__file_descriptor_proto__free_unpacked(ix.files[i].fd, NULL);
        free(ix.files[i].deps);
    }
    for (size_t i = 0; i < ix.nsymbols; i++)
        free(ix.symbols[i].name);
    for (size_t i = 0; i < ix.nservices; i++)
        free(ix.services[i]);
    free(ix.files);
    free(ix.symbols);
    free(ix.services);
    memset(&ix, 0, sizeof ix);
}

/* Appends file f and, depth first, everything it imports (each once). */
static void collect(int f, bool *seen, ProtobufCBinaryData *out, size_t *n)
{
    if (seen[f])
        return;
    seen[f] = true;
    out[(*n)++] = (ProtobufCBinaryData){ix.files[f].len, (uint8_t *)ix.files[f].bytes};
    for (size_t d = 0; d < ix.files[f].ndeps; d++)
        collect(ix.files[f].deps[d], seen, out, n);
}

static int symbol_file(const char *sym)
{
    if (sym[0] == '.')
        sym++; /* a leading dot is how fully-qualified type names are written in descriptors */
    for (size_t i = 0; i < ix.nsymbols; i++)
        if (strcmp(ix.symbols[i].name, sym) == 0)
            return ix.symbols[i].file;
    return -1;
}

static bool is_message(const char *sym)
{
    if (sym[0] == '.')
        sym++;
    int f = symbol_file(sym);
    if (f < 0)
        return false;
    /* A message, not a field: its name is a message of that file (top level or nested). */
    const Google__Protobuf__FileDescriptorProto *fd = ix.files[f].fd;
    const char *pkg = fd->package ? fd->package : "";
    size_t pl = strlen(pkg);
    if (strncmp(sym, pkg, pl) != 0)
        return false;
    const char *rest = sym + pl + (pl ? 1 : 0);
    for (size_t m = 0; m < fd->n_message_type; m++)
        if (strcmp(fd->message_type[m]->name, rest) == 0)
            return true;
    return false;
}

static void answer(srv_call *c, const Grpc__Reflection__V1__ServerReflectionRequest *req)
{
    Grpc__Reflection__V1__ServerReflectionResponse resp;
    grpc__reflection__v1__server_reflection_response__init(&resp);
    resp.valid_host = req->host;
    resp.original_request = (Grpc__Reflection__V1__ServerReflectionRequest *)req;

    Grpc__Reflection__V1__FileDescriptorResponse fdr;
    Grpc__Reflection__V1__ListServiceResponse lsr;
    Grpc__Reflection__V1__ErrorResponse er;
    Grpc__Reflection__V1__ExtensionNumberResponse enr;
    ProtobufCBinaryData *files = NULL;
    bool *seen = NULL;
    Grpc__Reflection__V1__ServiceResponse *svcs = NULL, **svc_ptrs = NULL;
    char msg[320];
    int f = -1;

    grpc__reflection__v1__error_response__init(&er);
    switch (req->message_request_case) {
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        f = file_index(req->file_by_filename);
        if (f < 0)
            snprintf(msg, sizeof msg, "file not found: %.256s", req->file_by_filename);
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL:
        f = symbol_file(req->file_containing_symbol);
        if (f < 0)
            snprintf(msg, sizeof msg, "symbol not found: %.256s", req->file_containing_symbol);
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_EXTENSION:
        snprintf(
            msg, sizeof msg, "extension not found: %.200s(%d)",
            req->file_containing_extension ? req->file_containing_extension->containing_type : "",
            req->file_containing_extension ? req->file_containing_extension->extension_number : 0);
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_ALL_EXTENSION_NUMBERS_OF_TYPE:
        if (is_message(req->all_extension_numbers_of_type)) {
            /* orderd's messages declare no extensions: the list is empty. */
            grpc__reflection__v1__extension_number_response__init(&enr);
            enr.base_type_name = req->all_extension_numbers_of_type;
            resp.message_response_case =
                GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ALL_EXTENSION_NUMBERS_RESPONSE;
            resp.all_extension_numbers_response = &enr;
        } else {
            snprintf(msg, sizeof msg, "type not found: %.256s", req->all_extension_numbers_of_type);
        }
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        svcs = calloc(ix.nservices, sizeof *svcs);
        svc_ptrs = calloc(ix.nservices, sizeof *svc_ptrs);
        if (!svcs || !svc_ptrs) {
            snprintf(msg, sizeof msg, "out of memory");
            break;
        }
        for (size_t i = 0; i < ix.nservices; i++) {
            grpc__reflection__v1__service_response__init(&svcs[i]);
            svcs[i].name = ix.services[i];
            svc_ptrs[i] = &svcs[i];
        }
        grpc__reflection__v1__list_service_response__init(&lsr);
        lsr.n_service = ix.nservices;
        lsr.service = svc_ptrs;
        resp.message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        resp.list_services_response = &lsr;
        break;
    default:
        er.error_code = GRPC_STATUS_INVALID_ARGUMENT;
        snprintf(msg, sizeof msg, "empty or unknown reflection request");
        break;
    }

    if (f >= 0) {
        files = calloc(ix.nfiles, sizeof *files);
        seen = calloc(ix.nfiles, sizeof *seen);
        if (files && seen) {
            size_t n = 0;
            collect(f, seen, files, &n);
            grpc__reflection__v1__file_descriptor_response__init(&fdr);
            fdr.n_file_descriptor_proto = n;
            fdr.file_descriptor_proto = files;
            resp.message_response_case =
                GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
            resp.file_descriptor_response = &fdr;
        } else {
            snprintf(msg, sizeof msg, "out of memory");
        }
    }
    if (resp.message_response_case ==
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE__NOT_SET) {
        if (!er.error_code)
            er.error_code = GRPC_STATUS_NOT_FOUND;
        er.error_message = msg;
        resp.message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
        resp.error_response = &er;
    }
    srv_stream_send(c, &resp.base);
    free(files);
    free(seen);
    free(svcs);
    free(svc_ptrs);
}

void srv_reflection_start(srv_call *c)
{
    if (!srv_stream_recv(c))
        srv_stream_finish(c, GRPC_STATUS_INTERNAL, "cannot read the request");
}

void srv_reflection_recv(srv_call *c, const uint8_t *msg, size_t len, bool half_closed)
{
    if (half_closed) {
        srv_stream_finish(c, GRPC_STATUS_OK, "");
        return;
    }
    Grpc__Reflection__V1__ServerReflectionRequest *req =
        grpc__reflection__v1__server_reflection_request__unpack(NULL, len, msg);
    if (!req) {
        srv_stream_finish(c, GRPC_STATUS_INVALID_ARGUMENT,
                          "the request is not a valid ServerReflectionRequest message");
        return;
    }
    answer(c, req);
    grpc__reflection__v1__server_reflection_request__free_unpacked(req, NULL);
}

void srv_reflection_sent(srv_call *c, bool ok)
{
    if (ok && !atomic_load(&c->w->srv->shutting_down))
        srv_stream_recv(c); /* one request at a time: read the next after answering */
    else if (ok)
        srv_stream_finish(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
}

void srv_reflection_tick(srv_call *c)
{
    if (atomic_load(&c->w->srv->shutting_down) && !c->send_in_flight)
        srv_stream_finish(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
}
