/* test_auth.c — server/auth.c: JWT verification (HS256, RS256 with keys made here),
 * the claims, everything malformed, minting, and a bounded fuzz loop.
 * Tokens are built here with OpenSSL's own base64 so the encoder under test is not
 * trusted to check itself. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

#include "server/auth.h"

#define NOW    1700000000LL
#define SECRET "0123456789abcdef0123456789abcdef-hs"
#define HDR_HS "{\"alg\":\"HS256\",\"typ\":\"JWT\"}"
#define HDR_RS "{\"alg\":\"RS256\",\"typ\":\"JWT\"}"

static EVP_PKEY *rsa1, *rsa2; /* rsa1 is configured; rsa2 is a stranger's */
static char *rsa1_pem;
static srv_config cfg_hs, cfg_rs, cfg_both, cfg_open; /* open: no iss/aud configured */
static srv_auth *auth_hs, *auth_rs, *auth_both, *auth_open;

/* ---- building tokens ---- */

static char *b64url(const unsigned char *in, size_t n)
{
    char *out = malloc(n / 3 * 4 + 8);
    assert_non_null(out);
    int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    while (len > 0 && out[len - 1] == '=')
        len--;
    out[len] = '\0';
    for (char *p = out; *p; p++)
        *p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
    return out;
}

/* header.claims.signature; signed with hs_key (HMAC-SHA256), else rs (RSA-SHA256), else
 * with an empty signature. Caller frees. */
static char *jwt(const char *header, const char *claims, const char *hs_key, EVP_PKEY *rs)
{
    char *h = b64url((const unsigned char *)header, strlen(header));
    char *c = b64url((const unsigned char *)claims, strlen(claims));
    size_t n = strlen(h) + strlen(c) + 2;
    char *input = malloc(n);
    assert_non_null(input);
    snprintf(input, n, "%s.%s", h, c);
    unsigned char sig[1024];
    size_t siglen = 0;
    if (hs_key) {
        unsigned int l = 0;
        HMAC(EVP_sha256(), hs_key, (int)strlen(hs_key), (unsigned char *)input, strlen(input), sig,
             &l);
        siglen = l;
    } else if (rs) {
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        siglen = sizeof sig;
        assert_int_equal(EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, rs), 1);
        assert_int_equal(EVP_DigestSign(ctx, sig, &siglen, (unsigned char *)input, strlen(input)),
                         1);
        EVP_MD_CTX_free(ctx);
    }
    char *s = b64url(sig, siglen);
    size_t tn = n + strlen(s) + 1;
    char *tok = malloc(tn);
    assert_non_null(tok);
    snprintf(tok, tn, "%s.%s", input, s);
    free(h);
    free(c);
    free(input);
    free(s);
    return tok;
}

static char claims_buf[4096];

/* Claims with sub alice, role customer, exp NOW+60, iss and aud as configured, plus
 * `extra` (more members, never one of those: duplicate claims are refused). */
static const char *claims(const char *extra)
{
    snprintf(claims_buf, sizeof claims_buf,
             "{\"sub\":\"alice\",\"roles\":[\"customer\"],\"exp\":%lld,\"iss\":\"iss-test\","
             "\"aud\":\"aud-test\"%s%s}",
             NOW + 60, extra ? "," : "", extra ? extra : "");
    return claims_buf;
}

static char why[128];
static order_caller caller;

static int verify_bearer(const srv_auth *a, const char *tok)
{
    char hv[16384];
    snprintf(hv, sizeof hv, "Bearer %s", tok);
    memset(&caller, 0, sizeof caller);
    why[0] = '\0';
    return srv_auth_verify(a, hv, strlen(hv), NOW, &caller, why, sizeof why);
}

/* Verifies and expects a refusal with `reason`; `why` must not quote the token. */
static void expect_refused(const srv_auth *a, const char *tok, const char *reason)
{
    int rc = verify_bearer(a, tok);
    if (rc != -1)
        fail_msg("accepted a token that should fail with \"%s\"", reason);
    if (reason && strcmp(why, reason) != 0)
        fail_msg("reason \"%s\", expected \"%s\"", why, reason);
    const char *p = tok;
    while (*p) { /* no part of the token, of 6+ characters, appears in the reason */
        size_t n = strcspn(p, ".");
        if (n >= 6) {
            char part[16];
            snprintf(part, sizeof part, "%.6s", p);
            assert_null(strstr(why, part));
        }
        p += n + (p[n] == '.');
    }
}

static void expect_hs_refused(const char *header, const char *cl, const char *reason)
{
    char *tok = jwt(header, cl, SECRET, NULL);
    expect_refused(auth_hs, tok, reason);
    free(tok);
}

static void expect_hs_accepted(const char *cl)
{
    char *tok = jwt(HDR_HS, cl, SECRET, NULL);
    if (verify_bearer(auth_hs, tok) != 0)
        fail_msg("refused (%s): %s", why, cl);
    free(tok);
}

/* ---- fixtures ---- */

static char *pem_of(EVP_PKEY *k)
{
    BIO *bio = BIO_new(BIO_s_mem());
    assert_int_equal(PEM_write_bio_PUBKEY(bio, k), 1);
    char *data;
    long n = BIO_get_mem_data(bio, &data);
    char *pem = strndup(data, (size_t)n);
    BIO_free(bio);
    return pem;
}

static void base_cfg(srv_config *c)
{
    memset(c, 0, sizeof *c);
    snprintf(c->environment, sizeof c->environment, "development");
    snprintf(c->issuer, sizeof c->issuer, "iss-test");
    snprintf(c->audience, sizeof c->audience, "aud-test");
}

static int group_setup(void **state)
{
    (void)state;
    rsa1 = EVP_RSA_gen(2048);
    rsa2 = EVP_RSA_gen(2048);
    if (!rsa1 || !rsa2)
        return -1;
    rsa1_pem = pem_of(rsa1);

    base_cfg(&cfg_hs);
    cfg_hs.hs256_secret = (unsigned char *)SECRET;
    cfg_hs.hs256_secret_len = strlen(SECRET);
    base_cfg(&cfg_rs);
    cfg_rs.rs256_public_key_pem = rsa1_pem;
    base_cfg(&cfg_both);
    cfg_both.hs256_secret = (unsigned char *)SECRET;
    cfg_both.hs256_secret_len = strlen(SECRET);
    cfg_both.rs256_public_key_pem = rsa1_pem;
    memset(&cfg_open, 0, sizeof cfg_open);
    cfg_open.hs256_secret = (unsigned char *)SECRET;
    cfg_open.hs256_secret_len = strlen(SECRET);

    char err[256];
    auth_hs = srv_auth_create(&cfg_hs, err, sizeof err);
    auth_rs = srv_auth_create(&cfg_rs, err, sizeof err);
    auth_both = srv_auth_create(&cfg_both, err, sizeof err);
    auth_open = srv_auth_create(&cfg_open, err, sizeof err);
    return auth_hs && auth_rs && auth_both && auth_open ? 0 : -1;
}

static int group_teardown(void **state)
{
    (void)state;
    srv_auth_destroy(auth_hs);
    srv_auth_destroy(auth_rs);
    srv_auth_destroy(auth_both);
    srv_auth_destroy(auth_open);
    EVP_PKEY_free(rsa1);
    EVP_PKEY_free(rsa2);
    free(rsa1_pem);
    return 0;
}

/* ---- tests ---- */

static void test_hs256_valid(void **state)
{
    (void)state;
    char *tok = jwt(HDR_HS,
                    "{\"sub\":\"alice\",\"roles\":[\"customer\",\"admin\",\"auditor\"],"
                    "\"exp\":1700000060,\"iat\":1700000000,\"nbf\":1700000000,"
                    "\"iss\":\"iss-test\",\"aud\":\"aud-test\",\"kid\":\"x\"}",
                    SECRET, NULL);
    assert_int_equal(verify_bearer(auth_hs, tok), 0);
    assert_string_equal(caller.subject, "alice");
    assert_int_equal(caller.roles, ORDER_ROLE_CUSTOMER | ORDER_ROLE_ADMIN);
    assert_int_equal(verify_bearer(auth_both, tok), 0);
    free(tok);
}

static void test_scheme(void **state)
{
    (void)state;
    char *tok = jwt(HDR_HS, claims(NULL), SECRET, NULL);
    char hv[2048];
    static const char *const ok[] = {"Bearer", "bearer", "BEARER", "bEaReR"};
    for (size_t i = 0; i < 4; i++) {
        snprintf(hv, sizeof hv, "%s %s", ok[i], tok);
        assert_int_equal(srv_auth_verify(auth_hs, hv, strlen(hv), NOW, &caller, why, sizeof why),
                         0);
    }
    static const char *const bad[][2] = {{"Basic ", ""},   {"Bearer  ", ""}, {"Bearer\t", ""},
                                         {" Bearer ", ""}, {"Bearer ", " "}, {"Bearer", ""},
                                         {"Token ", ""},   {"", ""}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(hv, sizeof hv, "%s%s%s", bad[i][0], tok, bad[i][1]);
        assert_int_equal(srv_auth_verify(auth_hs, hv, strlen(hv), NOW, &caller, why, sizeof why),
                         -1);
    }
    snprintf(hv, sizeof hv, "Basic dXNlcjpwYXNz");
    assert_int_equal(srv_auth_verify(auth_hs, hv, strlen(hv), NOW, &caller, why, sizeof why), -1);
    assert_string_equal(why, "not a bearer token");
    assert_int_equal(srv_auth_verify(auth_hs, "", 0, NOW, &caller, why, sizeof why), -1);
    assert_string_equal(why, "missing token");
    assert_int_equal(srv_auth_verify(auth_hs, NULL, 0, NOW, &caller, why, sizeof why), -1);
    assert_int_equal(srv_auth_verify(auth_hs, "Bearer ", 7, NOW, &caller, why, sizeof why), -1);
    assert_string_equal(why, "missing token");

    /* The value is counted, not NUL-terminated: bytes past len are not read... */
    snprintf(hv, sizeof hv, "Bearer %sGARBAGE", tok);
    size_t len = 7 + strlen(tok);
    assert_int_equal(srv_auth_verify(auth_hs, hv, len, NOW, &caller, why, sizeof why), 0);
    /* ...and a NUL inside the counted bytes is refused. */
    snprintf(hv, sizeof hv, "Bearer %s", tok);
    assert_int_equal(srv_auth_verify(auth_hs, hv, len + 1, NOW, &caller, why, sizeof why), -1);
    free(tok);
}

static void test_exp(void **state)
{
    (void)state;
    char cl[512];
    snprintf(cl, sizeof cl, "{\"sub\":\"a\",\"roles\":[\"admin\"],\"exp\":%lld}", NOW + 1);
    char *tok = jwt(HDR_HS, cl, SECRET, NULL);
    assert_int_equal(verify_bearer(auth_open, tok), 0);
    free(tok);
    snprintf(cl, sizeof cl, "{\"sub\":\"a\",\"roles\":[\"admin\"],\"exp\":%lld}", NOW);
    tok = jwt(HDR_HS, cl, SECRET, NULL);
    expect_refused(auth_open, tok, "token expired"); /* dead from its exp second on */
    free(tok);
    snprintf(cl, sizeof cl, "{\"sub\":\"a\",\"roles\":[\"admin\"],\"exp\":%lld.5}", NOW - 1);
    tok = jwt(HDR_HS, cl, SECRET, NULL);
    expect_refused(auth_open, tok, "token expired");
    free(tok);
    tok = jwt(HDR_HS, "{\"sub\":\"a\",\"roles\":[\"admin\"]}", SECRET, NULL);
    expect_refused(auth_open, tok, "missing exp");
    free(tok);
    tok = jwt(HDR_HS, "{\"sub\":\"a\",\"roles\":[\"admin\"],\"exp\":\"9999999999\"}", SECRET, NULL);
    expect_refused(auth_open, tok, "malformed exp");
    free(tok);
    tok = jwt(HDR_HS, "{\"sub\":\"a\",\"roles\":[\"admin\"],\"exp\":null}", SECRET, NULL);
    expect_refused(auth_open, tok, "malformed exp");
    free(tok);
}

static void test_nbf_iat(void **state)
{
    (void)state;
    char extra[128];
    snprintf(extra, sizeof extra, "\"nbf\":%lld", NOW + SRV_AUTH_CLOCK_SKEW_S);
    expect_hs_accepted(claims(extra));
    snprintf(extra, sizeof extra, "\"nbf\":%lld", NOW + SRV_AUTH_CLOCK_SKEW_S + 1);
    expect_hs_refused(HDR_HS, claims(extra), "token not yet valid");
    snprintf(extra, sizeof extra, "\"iat\":%lld", NOW - 100000);
    expect_hs_accepted(claims(extra));
    snprintf(extra, sizeof extra, "\"iat\":%lld", NOW + 3600);
    expect_hs_refused(HDR_HS, claims(extra), "token issued in the future");
    expect_hs_refused(HDR_HS, claims("\"iat\":\"now\""), "malformed iat");
    expect_hs_refused(HDR_HS, claims("\"nbf\":true"), "malformed nbf");
}

static void test_bad_signature(void **state)
{
    (void)state;
    char *tok = jwt(HDR_HS, claims(NULL), SECRET, NULL);
    size_t n = strlen(tok);
    /* one character changed in each part: header, claims, signature (first and last) */
    size_t d1 = (size_t)(strchr(tok, '.') - tok), d2 = (size_t)(strrchr(tok, '.') - tok);
    size_t at[] = {1, d1 + 2, d2 + 1, n - 1};
    for (size_t i = 0; i < 4; i++) {
        char *bad = strdup(tok);
        bad[at[i]] = bad[at[i]] == 'A' ? 'B' : 'A';
        expect_refused(auth_hs, bad, NULL);
        free(bad);
    }
    char *other = jwt(HDR_HS, claims(NULL), "another-secret-another-secret-000", NULL);
    expect_refused(auth_hs, other, "bad signature");
    free(other);
    /* a signature of the wrong length */
    char *shortsig = strdup(tok);
    shortsig[n - 4] = '\0';
    expect_refused(auth_hs, shortsig, "bad signature");
    free(shortsig);
    /* nothing at all */
    char *nosig = strdup(tok);
    nosig[d2 + 1] = '\0';
    expect_refused(auth_hs, nosig, "bad signature");
    free(nosig);
    free(tok);
}

static void test_algorithms_pinned(void **state)
{
    (void)state;
    /* alg none, with an empty signature and with one */
    char *tok = jwt("{\"alg\":\"none\"}", claims(NULL), NULL, NULL);
    expect_refused(auth_hs, tok, "unsupported alg");
    expect_refused(auth_both, tok, "unsupported alg");
    free(tok);
    tok = jwt("{\"alg\":\"none\"}", claims(NULL), SECRET, NULL);
    expect_refused(auth_hs, tok, "unsupported alg");
    free(tok);
    static const char *const algs[] = {"None",  "NONE",  "HS384", "HS512", "hs256",
                                       "RS384", "PS256", "ES256", "EdDSA", ""};
    for (size_t i = 0; i < sizeof algs / sizeof algs[0]; i++) {
        char hdr[64];
        snprintf(hdr, sizeof hdr, "{\"alg\":\"%s\"}", algs[i]);
        tok = jwt(hdr, claims(NULL), SECRET, NULL);
        expect_refused(auth_both, tok, "unsupported alg");
        free(tok);
    }
    expect_hs_refused("{\"typ\":\"JWT\"}", claims(NULL), "malformed token header");
    expect_hs_refused("{\"alg\":256}", claims(NULL), "malformed token header");
    expect_hs_refused("{\"alg\":\"HS256\",\"alg\":\"none\"}", claims(NULL),
                      "malformed token header");
    expect_hs_refused("{\"alg\":\"HS256\",\"crit\":[\"exp\"]}", claims(NULL),
                      "unsupported critical header");

    /* HS256 when only RS256 is configured: refused, even when "signed" with the public key
     * as the HMAC secret (the classic key-confusion attack). */
    tok = jwt(HDR_HS, claims(NULL), SECRET, NULL);
    expect_refused(auth_rs, tok, "alg not enabled");
    free(tok);
    tok = jwt(HDR_HS, claims(NULL), rsa1_pem, NULL);
    expect_refused(auth_rs, tok, "alg not enabled");
    expect_refused(auth_both, tok, "bad signature");
    free(tok);
    /* RS256 when only HS256 is configured */
    tok = jwt(HDR_RS, claims(NULL), NULL, rsa1);
    expect_refused(auth_hs, tok, "alg not enabled");
    free(tok);
}

static void test_rs256(void **state)
{
    (void)state;
    char *tok = jwt(HDR_RS, claims(NULL), NULL, rsa1);
    assert_int_equal(verify_bearer(auth_rs, tok), 0);
    assert_string_equal(caller.subject, "alice");
    assert_int_equal(caller.roles, ORDER_ROLE_CUSTOMER);
    assert_int_equal(verify_bearer(auth_both, tok), 0);
    /* a flipped character in the claims */
    char *bad = strdup(tok);
    char *c = strchr(bad, '.') + 3;
    *c = *c == 'A' ? 'B' : 'A';
    expect_refused(auth_rs, bad, NULL);
    free(bad);
    free(tok);

    tok = jwt(HDR_RS, claims(NULL), NULL, rsa2); /* a stranger's key */
    expect_refused(auth_rs, tok, "bad signature");
    expect_refused(auth_both, tok, "bad signature");
    free(tok);

    /* RS256 header, HMAC signature */
    tok = jwt(HDR_RS, claims(NULL), SECRET, NULL);
    expect_refused(auth_both, tok, "bad signature");
    free(tok);
}

static void test_issuer_audience(void **state)
{
    (void)state;
    char cl[512];
    const char *base = "\"sub\":\"a\",\"roles\":[\"service\"],\"exp\":1700000060";
    snprintf(cl, sizeof cl, "{%s,\"iss\":\"evil\",\"aud\":\"aud-test\"}", base);
    expect_hs_refused(HDR_HS, cl, "wrong issuer");
    snprintf(cl, sizeof cl, "{%s,\"aud\":\"aud-test\"}", base);
    expect_hs_refused(HDR_HS, cl, "wrong issuer");
    snprintf(cl, sizeof cl, "{%s,\"iss\":[\"iss-test\"],\"aud\":\"aud-test\"}", base);
    expect_hs_refused(HDR_HS, cl, "wrong issuer");
    snprintf(cl, sizeof cl, "{%s,\"iss\":\"iss-test\",\"aud\":\"other\"}", base);
    expect_hs_refused(HDR_HS, cl, "wrong audience");
    snprintf(cl, sizeof cl, "{%s,\"iss\":\"iss-test\"}", base);
    expect_hs_refused(HDR_HS, cl, "wrong audience");
    snprintf(cl, sizeof cl, "{%s,\"iss\":\"iss-test\",\"aud\":[\"x\",\"y\"]}", base);
    expect_hs_refused(HDR_HS, cl, "wrong audience");
    snprintf(cl, sizeof cl, "{%s,\"iss\":\"iss-test\",\"aud\":[\"x\",1,\"aud-test\"]}", base);
    expect_hs_accepted(cl);
    assert_int_equal(caller.roles, ORDER_ROLE_SERVICE);

    /* Not configured: not checked. */
    snprintf(cl, sizeof cl, "{%s,\"iss\":\"anyone\",\"aud\":\"anything\"}", base);
    char *tok = jwt(HDR_HS, cl, SECRET, NULL);
    assert_int_equal(verify_bearer(auth_open, tok), 0);
    free(tok);
}

static void test_subject_and_roles(void **state)
{
    (void)state;
    expect_hs_refused(HDR_HS,
                      "{\"roles\":[\"admin\"],\"exp\":1700000060,\"iss\":\"iss-test\","
                      "\"aud\":\"aud-test\"}",
                      "missing sub");
    char cl[1024], sub[200];
    const char *tail = "\"roles\":[\"admin\"],\"exp\":1700000060,\"iss\":\"iss-test\","
                       "\"aud\":\"aud-test\"";
    static const char *const bad_subs[] = {"\"\"",          "42",       "null", "[\"a\"]",
                                           "\"a\\u0001b\"", "\"a\\nb\""};
    for (size_t i = 0; i < sizeof bad_subs / sizeof bad_subs[0]; i++) {
        snprintf(cl, sizeof cl, "{\"sub\":%s,%s}", bad_subs[i], tail);
        expect_hs_refused(HDR_HS, cl, "invalid sub");
    }
    memset(sub, 'x', 129);
    sub[129] = '\0';
    snprintf(cl, sizeof cl, "{\"sub\":\"%s\",%s}", sub, tail);
    expect_hs_refused(HDR_HS, cl, "invalid sub");
    sub[128] = '\0';
    snprintf(cl, sizeof cl, "{\"sub\":\"%s\",%s}", sub, tail);
    expect_hs_accepted(cl);
    assert_string_equal(caller.subject, sub);
    snprintf(cl, sizeof cl, "{\"sub\":\"j\\u00fcrgen\",%s}", tail); /* UTF-8 is fine */
    expect_hs_accepted(cl);
    assert_string_equal(caller.subject, "j\xc3\xbcrgen");

    const char *head = "\"sub\":\"a\",\"exp\":1700000060,\"iss\":\"iss-test\",\"aud\":\"aud-test\"";
    snprintf(cl, sizeof cl, "{%s}", head);
    expect_hs_refused(HDR_HS, cl, "missing roles");
    snprintf(cl, sizeof cl, "{%s,\"roles\":\"admin\"}", head);
    expect_hs_refused(HDR_HS, cl, "malformed roles");
    snprintf(cl, sizeof cl, "{%s,\"roles\":[\"admin\",7]}", head);
    expect_hs_refused(HDR_HS, cl, "malformed roles");
    snprintf(cl, sizeof cl, "{%s,\"roles\":[]}", head);
    expect_hs_refused(HDR_HS, cl, "no known role");
    snprintf(cl, sizeof cl, "{%s,\"roles\":[\"root\",\"Admin\",\"admin \"]}", head);
    expect_hs_refused(HDR_HS, cl, "no known role");
    snprintf(cl, sizeof cl, "{%s,\"roles\":[\"root\",\"service\",\"admin\",\"customer\"]}", head);
    expect_hs_accepted(cl);
    assert_int_equal(caller.roles, ORDER_ROLE_CUSTOMER | ORDER_ROLE_SERVICE | ORDER_ROLE_ADMIN);
}

static void test_malformed(void **state)
{
    (void)state;
    char *tok = jwt(HDR_HS, claims(NULL), SECRET, NULL);
    char buf[20000];
    const char *d2 = strrchr(tok, '.');

    /* two parts, four parts, empty parts */
    snprintf(buf, sizeof buf, "%.*s", (int)(d2 - tok), tok);
    expect_refused(auth_hs, buf, "malformed token");
    snprintf(buf, sizeof buf, "%s.AAAA", tok);
    expect_refused(auth_hs, buf, "malformed token");
    snprintf(buf, sizeof buf, "%s", strchr(tok, '.'));
    expect_refused(auth_hs, buf, "malformed token");
    snprintf(buf, sizeof buf, "%.*s.%s", (int)(strchr(tok, '.') - tok), tok, d2);
    expect_refused(auth_hs, buf, "malformed token");
    expect_refused(auth_hs, "..", "malformed token");
    expect_refused(auth_hs, "a.b.c", "malformed token header");

    /* characters outside base64url: standard base64, padding, space */
    static const char bad_chars[] = "+/= *%\\\"";
    for (const char *c = bad_chars; *c; c++) {
        snprintf(buf, sizeof buf, "%s", tok);
        buf[3] = *c;
        expect_refused(auth_hs, buf, "malformed token");
        snprintf(buf, sizeof buf, "%s%c", tok, *c);
        expect_refused(auth_hs, buf, NULL);
    }
    snprintf(buf, sizeof buf, "%s==", tok);
    expect_refused(auth_hs, buf, "malformed token");

    /* valid base64url of something that is not a JSON object */
    char *t2 = jwt("[\"alg\",\"HS256\"]", claims(NULL), SECRET, NULL);
    expect_refused(auth_hs, t2, "malformed token header");
    free(t2);
    t2 = jwt("{\"alg\":\"HS256\"", claims(NULL), SECRET, NULL);
    expect_refused(auth_hs, t2, "malformed token header");
    free(t2);
    t2 = jwt(HDR_HS, "not json", SECRET, NULL);
    expect_refused(auth_hs, t2, "malformed claims");
    free(t2);
    t2 = jwt(HDR_HS, "[1,2]", SECRET, NULL);
    expect_refused(auth_hs, t2, "malformed claims");
    free(t2);
    /* duplicate claims: which "sub" would win is not a question we answer */
    t2 = jwt(HDR_HS,
             "{\"sub\":\"alice\",\"sub\":\"admin\",\"roles\":[\"admin\"],\"exp\":1700000060,"
             "\"iss\":\"iss-test\",\"aud\":\"aud-test\"}",
             SECRET, NULL);
    expect_refused(auth_hs, t2, "malformed claims");
    free(t2);

    /* too large, even if well signed */
    char big[SRV_AUTH_MAX_TOKEN];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    snprintf(buf, sizeof buf,
             "{\"sub\":\"a\",\"roles\":[\"admin\"],\"exp\":1700000060,"
             "\"iss\":\"iss-test\",\"aud\":\"aud-test\",\"pad\":\"%s\"}",
             big);
    t2 = jwt(HDR_HS, buf, SECRET, NULL);
    expect_refused(auth_hs, t2, "token too large");
    free(t2);
    free(tok);
}

static void test_mint_round_trip(void **state)
{
    (void)state;
    char err[256];
    char *tok = NULL, *tok2 = NULL;
    assert_int_equal(srv_auth_mint(&cfg_hs, "ops@example", ORDER_ROLE_ADMIN | ORDER_ROLE_SERVICE,
                                   900, NOW, &tok, err, sizeof err),
                     0);
    assert_non_null(tok);
    assert_int_equal(verify_bearer(auth_hs, tok), 0);
    assert_string_equal(caller.subject, "ops@example");
    assert_int_equal(caller.roles, ORDER_ROLE_ADMIN | ORDER_ROLE_SERVICE);
    assert_int_equal(verify_bearer(auth_both, tok), 0);
    assert_int_equal(verify_bearer(auth_open, tok), 0);

    /* valid until exp, not at it */
    char hv[4096];
    snprintf(hv, sizeof hv, "Bearer %s", tok);
    assert_int_equal(srv_auth_verify(auth_hs, hv, strlen(hv), NOW + 899, &caller, why, sizeof why),
                     0);
    assert_int_equal(srv_auth_verify(auth_hs, hv, strlen(hv), NOW + 900, &caller, why, sizeof why),
                     -1);
    assert_string_equal(why, "token expired");

    /* claims: iss/aud as configured, a fresh jti each time */
    const char *d1 = strchr(tok, '.'), *d2 = strrchr(tok, '.');
    unsigned char raw[2048];
    long n = srv__b64url_decode(d1 + 1, (size_t)(d2 - d1 - 1), raw, sizeof raw - 1);
    assert_true(n > 0);
    raw[n] = '\0';
    assert_non_null(strstr((char *)raw, "\"iss\":\"iss-test\""));
    assert_non_null(strstr((char *)raw, "\"aud\":\"aud-test\""));
    assert_non_null(strstr((char *)raw, "\"roles\":[\"service\",\"admin\"]"));
    assert_non_null(strstr((char *)raw, "\"jti\":"));
    assert_int_equal(srv_auth_mint(&cfg_hs, "ops@example", ORDER_ROLE_ADMIN | ORDER_ROLE_SERVICE,
                                   900, NOW, &tok2, err, sizeof err),
                     0);
    assert_string_not_equal(tok, tok2);
    free(tok);
    free(tok2);

    /* minted without iss/aud when none are configured */
    assert_int_equal(
        srv_auth_mint(&cfg_open, "svc", ORDER_ROLE_SERVICE, 60, NOW, &tok, err, sizeof err), 0);
    assert_int_equal(verify_bearer(auth_open, tok), 0);
    expect_refused(auth_hs, tok, "wrong issuer");
    free(tok);
}

static void test_mint_errors(void **state)
{
    (void)state;
    char err[256];
    char *tok = (char *)"sentinel";
    assert_int_equal(srv_auth_mint(&cfg_rs, "a", ORDER_ROLE_ADMIN, 60, NOW, &tok, err, sizeof err),
                     -1);
    assert_null(tok);
    assert_non_null(strstr(err, "ORDERD_AUTH_HS256_SECRET"));
    assert_int_equal(srv_auth_mint(&cfg_hs, "a", 0, 60, NOW, &tok, err, sizeof err), -1);
    assert_int_equal(srv_auth_mint(&cfg_hs, "a", 8, 60, NOW, &tok, err, sizeof err), -1);
    assert_int_equal(srv_auth_mint(&cfg_hs, "", ORDER_ROLE_ADMIN, 60, NOW, &tok, err, sizeof err),
                     -1);
    assert_int_equal(
        srv_auth_mint(&cfg_hs, "a\nb", ORDER_ROLE_ADMIN, 60, NOW, &tok, err, sizeof err), -1);
    assert_int_equal(srv_auth_mint(&cfg_hs, "a", ORDER_ROLE_ADMIN, 0, NOW, &tok, err, sizeof err),
                     -1);
    assert_int_equal(
        srv_auth_mint(&cfg_hs, "a", ORDER_ROLE_ADMIN, INT64_MAX, NOW, &tok, err, sizeof err), -1);
    assert_null(tok);
}

static void test_roles_parse(void **state)
{
    (void)state;
    assert_int_equal(srv_roles_parse("admin"), ORDER_ROLE_ADMIN);
    assert_int_equal(srv_roles_parse("customer,service"), ORDER_ROLE_CUSTOMER | ORDER_ROLE_SERVICE);
    assert_int_equal(srv_roles_parse(" admin , customer "), ORDER_ROLE_ADMIN | ORDER_ROLE_CUSTOMER);
    assert_int_equal(srv_roles_parse("admin,root"), 0);
    assert_int_equal(srv_roles_parse("admin,"), 0);
    assert_int_equal(srv_roles_parse(""), 0);
    assert_int_equal(srv_roles_parse("Admin"), 0);
    assert_int_equal(srv_roles_parse(NULL), 0);
    assert_string_equal(srv_role_name(ORDER_ROLE_CUSTOMER), "customer");
    assert_string_equal(srv_role_name(ORDER_ROLE_SERVICE), "service");
    assert_string_equal(srv_role_name(ORDER_ROLE_ADMIN), "admin");
    assert_null(srv_role_name(0));
    assert_null(srv_role_name(ORDER_ROLE_ADMIN | ORDER_ROLE_SERVICE));
}

static void test_create_errors(void **state)
{
    (void)state;
    char err[256];
    srv_config c;
    base_cfg(&c);
    assert_null(srv_auth_create(&c, err, sizeof err));
    assert_string_equal(err, "no JWT key: set ORDERD_AUTH_HS256_SECRET or auth.hs256_secret_file, "
                             "or auth.rs256_public_key_file");

    c.rs256_public_key_pem =
        (char *)"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n";
    assert_null(srv_auth_create(&c, err, sizeof err));
    assert_non_null(strstr(err, "auth.rs256_public_key_file"));

    EVP_PKEY *ec = EVP_EC_gen("P-256");
    assert_non_null(ec);
    char *pem = pem_of(ec);
    c.rs256_public_key_pem = pem;
    assert_null(srv_auth_create(&c, err, sizeof err));
    assert_non_null(strstr(err, "not an RSA key"));
    free(pem);
    EVP_PKEY_free(ec);

    EVP_PKEY *small = EVP_RSA_gen(1024);
    assert_non_null(small);
    pem = pem_of(small);
    c.rs256_public_key_pem = pem;
    assert_null(srv_auth_create(&c, err, sizeof err));
    assert_non_null(strstr(err, "2048"));
    free(pem);
    EVP_PKEY_free(small);

    srv_auth_destroy(NULL);
}

static void test_b64url(void **state)
{
    (void)state;
    unsigned char out[16];
    char txt[32];
    assert_int_equal(srv__b64url_decode("", 0, out, sizeof out), 0);
    assert_int_equal(srv__b64url_decode("QQ", 2, out, sizeof out), 1);
    assert_int_equal(out[0], 'A');
    assert_int_equal(srv__b64url_decode("QR", 2, out, sizeof out), -1); /* stray low bits */
    assert_int_equal(srv__b64url_decode("QUI", 3, out, sizeof out), 2);
    assert_int_equal(srv__b64url_decode("QUJ", 3, out, sizeof out), -1);
    assert_int_equal(srv__b64url_decode("Q", 1, out, sizeof out), -1);
    assert_int_equal(srv__b64url_decode("QQ==", 4, out, sizeof out), -1);
    assert_int_equal(srv__b64url_decode("-_-_", 4, out, sizeof out), 3);
    assert_int_equal(srv__b64url_decode("+/+/", 4, out, sizeof out), -1);
    assert_int_equal(srv__b64url_decode("QUJDRA", 6, out, 3), -1); /* cap */
    assert_int_equal(srv__b64url_encode((const unsigned char *)"\xfb\xff", 2, txt, sizeof txt), 3);
    assert_string_equal(txt, "-_8");
    assert_int_equal(srv__b64url_encode((const unsigned char *)"ABCD", 4, txt, 6), 0);
    assert_string_equal(txt, "");
    assert_int_equal(srv__b64url_encode((const unsigned char *)"ABCD", 4, txt, 7), 6);
    assert_string_equal(txt, "QUJDRA");
}

/* Several threads verify with the same srv_auth at once (ASan/UBSan watch the memory). */
static void *verify_many(void *arg)
{
    char **toks = arg;
    for (int i = 0; i < 150; i++) {
        for (int t = 0; t < 2; t++) {
            char hv[4096], w[64];
            order_caller oc;
            snprintf(hv, sizeof hv, "Bearer %s", toks[t]);
            if (srv_auth_verify(auth_both, hv, strlen(hv), NOW, &oc, w, sizeof w) != 0 ||
                strcmp(oc.subject, "alice") != 0)
                return (void *)1;
        }
    }
    return NULL;
}

static void test_concurrent_verify(void **state)
{
    (void)state;
    char *toks[2] = {jwt(HDR_HS, claims(NULL), SECRET, NULL),
                     jwt(HDR_RS, claims(NULL), NULL, rsa1)};
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&th[i], NULL, verify_many, toks), 0);
    for (int i = 0; i < 4; i++) {
        void *rv;
        pthread_join(th[i], &rv);
        assert_null(rv);
    }
    free(toks[0]);
    free(toks[1]);
}

/* Bounded, deterministic fuzzing: random bytes, and random edits of valid tokens. Every
 * input is refused (an edit of a signed token can never verify) and nothing crashes. */
static void test_fuzz_verify(void **state)
{
    (void)state;
    srand(777);
    char buf[SRV_AUTH_MAX_TOKEN + 64];
    for (int iter = 0; iter < 20000; iter++) {
        size_t n = (size_t)(rand() % 300);
        for (size_t i = 0; i < n; i++)
            buf[i] = (char)(rand() % 256);
        if (rand() % 2 && n >= 7)
            memcpy(buf, "Bearer ", 7);
        assert_int_equal(srv_auth_verify(auth_both, buf, n, NOW, &caller, why, sizeof why), -1);
    }
    char *toks[2] = {jwt(HDR_HS, claims(NULL), SECRET, NULL),
                     jwt(HDR_RS, claims(NULL), NULL, rsa1)};
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \0";
    for (int iter = 0; iter < 4000; iter++) {
        const char *tok = toks[iter % 2];
        size_t len = (size_t)snprintf(buf, sizeof buf, "Bearer %s", tok);
        int edits = 1 + rand() % 3;
        for (int e = 0; e < edits; e++) {
            size_t at = 7 + (size_t)rand() % (len - 7);
            switch (rand() % 3) {
            case 0:
                buf[at] = alphabet[rand() % (sizeof alphabet - 1)];
                break;
            case 1:
                memmove(buf + at, buf + at + 1, len - at);
                len--;
                break;
            default:
                memmove(buf + at + 1, buf + at, len - at + 1);
                buf[at] = alphabet[rand() % (sizeof alphabet - 1)];
                len++;
            }
        }
        if (len == 7 + strlen(tok) && memcmp(buf + 7, tok, len - 7) == 0)
            continue; /* the edits cancelled out */
        int rc = srv_auth_verify(auth_both, buf, len, NOW, &caller, why, sizeof why);
        if (rc != -1)
            fail_msg("an edited token verified: %.*s", (int)len, buf);
    }
    free(toks[0]);
    free(toks[1]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hs256_valid),
        cmocka_unit_test(test_scheme),
        cmocka_unit_test(test_exp),
        cmocka_unit_test(test_nbf_iat),
        cmocka_unit_test(test_bad_signature),
        cmocka_unit_test(test_algorithms_pinned),
        cmocka_unit_test(test_rs256),
        cmocka_unit_test(test_issuer_audience),
        cmocka_unit_test(test_subject_and_roles),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_mint_round_trip),
        cmocka_unit_test(test_mint_errors),
        cmocka_unit_test(test_roles_parse),
        cmocka_unit_test(test_create_errors),
        cmocka_unit_test(test_b64url),
        cmocka_unit_test(test_concurrent_verify),
        cmocka_unit_test(test_fuzz_verify),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
