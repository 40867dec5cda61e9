/* auth.c — JWT verification and minting with libcrypto and jansson; see auth.h.
 *
 * DESIGN
 * No JWT library: the format is small and the dangerous parts are exactly the ones we
 * want in plain sight. The verifier checks the cheap, untrusted things first (scheme,
 * size, alphabet, three parts), then parses only the header to learn the algorithm,
 * refuses it unless the matching key is configured, checks the signature, and only then
 * parses the claims. A srv_auth is never written after srv_auth_create, so any number
 * of worker threads may verify with it at once; each call makes its own EVP_MD_CTX and
 * uses stack buffers bounded by SRV_AUTH_MAX_TOKEN.
 */
#include "server/auth.h"

#include <ctype.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

struct srv_auth {
    unsigned char *hs_key; /* NULL = HS256 not accepted */
    size_t hs_len;
    EVP_PKEY *rs_key; /* NULL = RS256 not accepted */
    char issuer[256];
    char audience[256];
};

/* ---- roles ------------------------------------------------------------------- */

static const struct {
    unsigned bit;
    const char *name;
} role_names[] = {
    {ORDER_ROLE_CUSTOMER, "customer"},
    {ORDER_ROLE_SERVICE, "service"},
    {ORDER_ROLE_ADMIN, "admin"},
};
#define ALL_ROLES (ORDER_ROLE_CUSTOMER | ORDER_ROLE_SERVICE | ORDER_ROLE_ADMIN)

static unsigned role_bit(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof role_names / sizeof role_names[0]; i++)
        if (strlen(role_names[i].name) == len && memcmp(role_names[i].name, name, len) == 0)
            return role_names[i].bit;
    return 0;
}

const char *srv_role_name(unsigned bit)
{
    for (size_t i = 0; i < sizeof role_names / sizeof role_names[0]; i++)
        if (role_names[i].bit == bit)
            return role_names[i].name;
    return NULL;
}

unsigned srv_roles_parse(const char *list)
{
    if (!list)
        return 0;
    unsigned roles = 0;
    const char *p = list;
    for (;;) {
        size_t n = strcspn(p, ",");
        const char *b = p, *e = p + n;
        while (b < e && isspace((unsigned char)*b))
            b++;
        while (e > b && isspace((unsigned char)e[-1]))
            e--;
        unsigned bit = role_bit(b, (size_t)(e - b));
        if (!bit)
            return 0; /* unknown or empty name */
        roles |= bit;
        if (!p[n])
            return roles;
        p += n + 1;
    }
}

/* ---- base64url ---------------------------------------------------------------- */

static const char b64url_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static int b64url_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

size_t srv__b64url_encode(const unsigned char *in, size_t n, char *out, size_t cap)
{
    size_t need = n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0);
    if (cap == 0)
        return 0;
    if (need >= cap) {
        out[0] = '\0';
        return 0;
    }
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
        out[o++] = b64url_chars[v >> 6 & 63];
        out[o++] = b64url_chars[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = b64url_chars[v >> 18 & 63];
        out[o++] = b64url_chars[v >> 12 & 63];
        out[o++] = b64url_chars[v >> 6 & 63];
    }
    out[o] = '\0';
    return o;
}

long srv__b64url_decode(const char *in, size_t inlen, unsigned char *out, size_t cap)
{
    size_t rem = inlen % 4;
    if (rem == 1)
        return -1;
    size_t need = inlen / 4 * 3 + (rem ? rem - 1 : 0);
    if (need > cap || need > (size_t)LONG_MAX)
        return -1;
    size_t o = 0, i = 0;
    for (; i + 4 <= inlen; i += 4) {
        int a = b64url_value((unsigned char)in[i]), b = b64url_value((unsigned char)in[i + 1]),
            c = b64url_value((unsigned char)in[i + 2]), d = b64url_value((unsigned char)in[i + 3]);
        if ((a | b | c | d) < 0)
            return -1;
        uint32_t v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6 | (uint32_t)d;
        out[o++] = (unsigned char)(v >> 16);
        out[o++] = (unsigned char)(v >> 8);
        out[o++] = (unsigned char)v;
    }
    if (rem) {
        int a = b64url_value((unsigned char)in[i]), b = b64url_value((unsigned char)in[i + 1]);
        int c = rem == 3 ? b64url_value((unsigned char)in[i + 2]) : 0;
        if ((a | b | c) < 0)
            return -1;
        /* The bits past the last whole byte must be zero, or two texts would decode to
         * the same bytes (a signature could be altered without breaking it). */
        if (rem == 2 && (b & 0x0f))
            return -1;
        if (rem == 3 && (c & 0x03))
            return -1;
        uint32_t v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6;
        out[o++] = (unsigned char)(v >> 16);
        if (rem == 3)
            out[o++] = (unsigned char)(v >> 8);
    }
    return (long)o;
}

/* ---- create / destroy --------------------------------------------------------- */

static void set_msg(char *buf, size_t cap, const char *msg)
{
    if (buf && cap)
        snprintf(buf, cap, "%s", msg);
}

srv_auth *srv_auth_create(const srv_config *cfg, char *err, size_t errlen)
{
    BIO *bio = NULL;
    srv_auth *a = calloc(1, sizeof *a);
    if (!a) {
        set_msg(err, errlen, "out of memory");
        return NULL;
    }
    /* jansson seeds its hash function on first use; do it now, before worker threads. */
    json_object_seed(0);

    if (!cfg->hs256_secret_len && !cfg->rs256_public_key_pem) {
        set_msg(err, errlen,
                "no JWT key: set ORDERD_AUTH_HS256_SECRET or auth.hs256_secret_file, or "
                "auth.rs256_public_key_file");
        goto fail;
    }
    if (cfg->hs256_secret_len) {
        a->hs_key = malloc(cfg->hs256_secret_len);
        if (!a->hs_key) {
            set_msg(err, errlen, "out of memory");
            goto fail;
        }
        memcpy(a->hs_key, cfg->hs256_secret, cfg->hs256_secret_len);
        a->hs_len = cfg->hs256_secret_len;
    }
    if (cfg->rs256_public_key_pem) {
        bio = BIO_new_mem_buf(cfg->rs256_public_key_pem, -1);
        a->rs_key = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
        ERR_clear_error();
        if (!a->rs_key) {
            set_msg(err, errlen,
                    "auth.rs256_public_key_file: not a PEM public key (\"BEGIN PUBLIC KEY\")");
            goto fail;
        }
        if (EVP_PKEY_get_base_id(a->rs_key) != EVP_PKEY_RSA) {
            set_msg(err, errlen, "auth.rs256_public_key_file: not an RSA key");
            goto fail;
        }
        if (EVP_PKEY_get_bits(a->rs_key) < 2048) {
            set_msg(err, errlen, "auth.rs256_public_key_file: RSA key shorter than 2048 bits");
            goto fail;
        }
    }
    snprintf(a->issuer, sizeof a->issuer, "%s", cfg->issuer);
    snprintf(a->audience, sizeof a->audience, "%s", cfg->audience);
    BIO_free(bio);
    return a;
fail:
    BIO_free(bio);
    srv_auth_destroy(a);
    return NULL;
}

void srv_auth_destroy(srv_auth *a)
{
    if (!a)
        return;
    if (a->hs_key) {
        OPENSSL_cleanse(a->hs_key, a->hs_len);
        free(a->hs_key);
    }
    EVP_PKEY_free(a->rs_key);
    free(a);
}

/* ---- verify ------------------------------------------------------------------- */

/* Largest decoded header or claims: a base64url text of SRV_AUTH_MAX_TOKEN characters. */
#define DECODED_MAX (SRV_AUTH_MAX_TOKEN / 4 * 3 + 3)

static json_t *decode_json(const char *b64, size_t len, unsigned char *buf)
{
    long n = srv__b64url_decode(b64, len, buf, DECODED_MAX);
    if (n <= 0)
        return NULL;
    json_t *j = json_loadb((const char *)buf, (size_t)n, JSON_REJECT_DUPLICATES, NULL);
    if (j && !json_is_object(j)) {
        json_decref(j);
        return NULL;
    }
    return j;
}

static bool valid_subject(const char *s, size_t n)
{
    if (n == 0 || n > ORDER_CUSTOMER_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
            return false;
    return true;
}

static bool aud_matches(const json_t *aud, const char *want)
{
    if (json_is_string(aud))
        return strcmp(json_string_value(aud), want) == 0;
    if (!json_is_array(aud))
        return false;
    size_t i;
    json_t *v;
    json_array_foreach(aud, i, v)
    {
        if (json_is_string(v) && strcmp(json_string_value(v), want) == 0)
            return true;
    }
    return false;
}

static bool check_signature(const srv_auth *a, bool hs, const char *input, size_t inlen,
                            const unsigned char *sig, size_t siglen)
{
    if (hs) {
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned int maclen = 0;
        if (siglen != 32 || !HMAC(EVP_sha256(), a->hs_key, (int)a->hs_len,
                                  (const unsigned char *)input, inlen, mac, &maclen))
            return false;
        return maclen == 32 && CRYPTO_memcmp(mac, sig, 32) == 0;
    }
    if ((int)siglen != EVP_PKEY_get_size(a->rs_key))
        return false;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    bool ok = ctx && EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, a->rs_key) == 1 &&
              EVP_DigestVerify(ctx, sig, siglen, (const unsigned char *)input, inlen) == 1;
    EVP_MD_CTX_free(ctx);
    ERR_clear_error(); /* the error queue is per thread; do not let failures pile up */
    return ok;
}

int srv_auth_verify(const srv_auth *a, const char *hv, size_t len, int64_t now, order_caller *out,
                    char *why, size_t whylen)
{
    unsigned char buf[DECODED_MAX];
    json_t *hdr = NULL, *claims = NULL;
    const char *reason = "malformed token";

    if (!hv || len == 0) {
        reason = "missing token";
        goto fail;
    }
    if (len < 7 || strncasecmp(hv, "bearer", 6) != 0 || hv[6] != ' ') {
        reason = "not a bearer token";
        goto fail;
    }
    const char *tok = hv + 7;
    size_t tlen = len - 7;
    if (tlen == 0) {
        reason = "missing token";
        goto fail;
    }
    if (tlen > SRV_AUTH_MAX_TOKEN) {
        reason = "token too large";
        goto fail;
    }
    size_t dot[2], ndots = 0;
    for (size_t i = 0; i < tlen; i++) {
        if (tok[i] == '.') {
            if (ndots == 2)
                goto fail;
            dot[ndots++] = i;
        } else if (b64url_value((unsigned char)tok[i]) < 0) {
            goto fail; /* padding, whitespace, NUL, standard base64's + and / */
        }
    }
    if (ndots != 2 || dot[0] == 0 || dot[1] == dot[0] + 1)
        goto fail;

    hdr = decode_json(tok, dot[0], buf);
    const char *alg = hdr ? json_string_value(json_object_get(hdr, "alg")) : NULL;
    if (!alg) {
        reason = "malformed token header";
        goto fail;
    }
    if (json_object_get(hdr, "crit")) {
        reason = "unsupported critical header";
        goto fail;
    }
    bool hs;
    if (strcmp(alg, "HS256") == 0 && a->hs_key) {
        hs = true;
    } else if (strcmp(alg, "RS256") == 0 && a->rs_key) {
        hs = false;
    } else {
        reason = (strcmp(alg, "HS256") == 0 || strcmp(alg, "RS256") == 0) ? "alg not enabled"
                                                                          : "unsupported alg";
        goto fail;
    }

    const char *sig64 = tok + dot[1] + 1;
    long siglen = srv__b64url_decode(sig64, tlen - dot[1] - 1, buf, sizeof buf);
    if (siglen <= 0 || !check_signature(a, hs, tok, dot[1], buf, (size_t)siglen)) {
        reason = "bad signature";
        goto fail;
    }

    /* Signed by us or by the key holder from here on. */
    claims = decode_json(tok + dot[0] + 1, dot[1] - dot[0] - 1, buf);
    if (!claims) {
        reason = "malformed claims";
        goto fail;
    }
    json_t *exp = json_object_get(claims, "exp");
    if (!json_is_number(exp)) {
        reason = exp ? "malformed exp" : "missing exp";
        goto fail;
    }
    if ((double)now >= json_number_value(exp)) {
        reason = "token expired";
        goto fail;
    }
    json_t *nbf = json_object_get(claims, "nbf");
    if (nbf &&
        (!json_is_number(nbf) || json_number_value(nbf) > (double)now + SRV_AUTH_CLOCK_SKEW_S)) {
        reason = json_is_number(nbf) ? "token not yet valid" : "malformed nbf";
        goto fail;
    }
    json_t *iat = json_object_get(claims, "iat");
    if (iat &&
        (!json_is_number(iat) || json_number_value(iat) > (double)now + SRV_AUTH_CLOCK_SKEW_S)) {
        reason = json_is_number(iat) ? "token issued in the future" : "malformed iat";
        goto fail;
    }
    if (a->issuer[0]) {
        const char *iss = json_string_value(json_object_get(claims, "iss"));
        if (!iss || strcmp(iss, a->issuer) != 0) {
            reason = "wrong issuer";
            goto fail;
        }
    }
    if (a->audience[0] && !aud_matches(json_object_get(claims, "aud"), a->audience)) {
        reason = "wrong audience";
        goto fail;
    }
    json_t *sub = json_object_get(claims, "sub");
    if (!json_is_string(sub) || !valid_subject(json_string_value(sub), json_string_length(sub))) {
        reason = sub ? "invalid sub" : "missing sub";
        goto fail;
    }
    json_t *roles = json_object_get(claims, "roles");
    if (!json_is_array(roles)) {
        reason = roles ? "malformed roles" : "missing roles";
        goto fail;
    }
    unsigned bits = 0;
    size_t i;
    json_t *r;
    json_array_foreach(roles, i, r)
    {
        if (!json_is_string(r)) {
            reason = "malformed roles";
            goto fail;
        }
        bits |= role_bit(json_string_value(r), json_string_length(r));
    }
    if (!bits) {
        reason = "no known role";
        goto fail;
    }

    memcpy(out->subject, json_string_value(sub), json_string_length(sub) + 1);
    out->roles = bits;
    json_decref(hdr);
    json_decref(claims);
    set_msg(why, whylen, "");
    return 0;
fail:
    json_decref(hdr);
    json_decref(claims);
    set_msg(why, whylen, reason);
    return -1;
}

/* ---- mint --------------------------------------------------------------------- */

int srv_auth_mint(const srv_config *cfg, const char *subject, unsigned roles, int64_t ttl_s,
                  int64_t now, char **out_token, char *err, size_t errlen)
{
    json_t *claims = NULL;
    char *payload = NULL, *token = NULL;
    *out_token = NULL;

    if (!cfg->hs256_secret_len) {
        set_msg(err, errlen,
                "no HS256 secret: set ORDERD_AUTH_HS256_SECRET or auth.hs256_secret_file");
        return -1;
    }
    if (!subject || !valid_subject(subject, strlen(subject))) {
        set_msg(err, errlen, "subject must be 1..128 bytes without control characters");
        return -1;
    }
    if (!roles || (roles & ~(unsigned)ALL_ROLES)) {
        set_msg(err, errlen, "roles must be one or more of customer, service, admin");
        return -1;
    }
    if (ttl_s <= 0 || now > INT64_MAX - ttl_s) {
        set_msg(err, errlen, "ttl must be positive");
        return -1;
    }
    unsigned char jti_raw[16];
    char jti[32];
    if (RAND_bytes(jti_raw, sizeof jti_raw) != 1) {
        ERR_clear_error();
        set_msg(err, errlen, "no randomness for jti");
        return -1;
    }
    srv__b64url_encode(jti_raw, sizeof jti_raw, jti, sizeof jti);

    json_t *role_list = json_array();
    claims = json_object();
    if (!claims || !role_list) {
        json_decref(role_list);
        goto oom;
    }
    for (size_t i = 0; i < sizeof role_names / sizeof role_names[0]; i++)
        if (roles & role_names[i].bit)
            json_array_append_new(role_list, json_string(role_names[i].name));
    int bad = json_object_set_new(claims, "sub", json_string(subject));
    bad |= json_object_set_new(claims, "roles", role_list);
    bad |= json_object_set_new(claims, "iat", json_integer(now));
    bad |= json_object_set_new(claims, "exp", json_integer(now + ttl_s));
    bad |= json_object_set_new(claims, "jti", json_string(jti));
    if (cfg->issuer[0])
        bad |= json_object_set_new(claims, "iss", json_string(cfg->issuer));
    if (cfg->audience[0])
        bad |= json_object_set_new(claims, "aud", json_string(cfg->audience));
    if (bad)
        goto oom;
    payload = json_dumps(claims, JSON_COMPACT | JSON_SORT_KEYS);
    if (!payload)
        goto oom;

    static const char header[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
    size_t plen = strlen(payload);
    size_t cap = (sizeof header + plen + 32) / 3 * 4 + 64;
    token = malloc(cap);
    if (!token)
        goto oom;
    size_t n = srv__b64url_encode((const unsigned char *)header, sizeof header - 1, token, cap);
    token[n++] = '.';
    n += srv__b64url_encode((const unsigned char *)payload, plen, token + n, cap - n);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    if (!HMAC(EVP_sha256(), cfg->hs256_secret, (int)cfg->hs256_secret_len,
              (const unsigned char *)token, n, mac, &maclen)) {
        ERR_clear_error();
        set_msg(err, errlen, "HMAC failed");
        goto fail;
    }
    token[n++] = '.';
    srv__b64url_encode(mac, maclen, token + n, cap - n);
    free(payload);
    json_decref(claims);
    *out_token = token;
    return 0;
oom:
    set_msg(err, errlen, "out of memory");
fail:
    free(token);
    free(payload);
    json_decref(claims);
    return -1;
}
