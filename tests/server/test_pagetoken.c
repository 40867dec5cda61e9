/* test_pagetoken.c — server/pagetoken.c: ListOrders cursors round-trip, and anything
 * forged, altered, truncated or from another key or query is refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "server/auth.h"
#include "server/pagetoken.h"

static const unsigned char key[] = "0123456789abcdef0123456789abcdef";
#define KEYLEN (sizeof key - 1)
static const char id[] = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
static const char scope[] = "c=alice;s=1,2";

static void make(char tok[SRV_PAGETOKEN_LEN + 1])
{
    assert_int_equal(
        srv_pagetoken_encode(key, KEYLEN, scope, 1700000000123456, id, tok, SRV_PAGETOKEN_LEN + 1),
        0);
}

static void test_round_trip(void **state)
{
    (void)state;
    char tok[SRV_PAGETOKEN_LEN + 1];
    make(tok);
    assert_int_equal(strlen(tok), SRV_PAGETOKEN_LEN);
    assert_null(strpbrk(tok, "=+/")); /* base64url, no padding: safe in any transport */
    int64_t at = 0;
    char out[37];
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, tok, &at, out), 0);
    assert_int_equal(at, 1700000000123456);
    assert_string_equal(out, id);

    /* Upper-case ids come back in canonical lower case; extreme times survive. */
    assert_int_equal(srv_pagetoken_encode(key, KEYLEN, "", INT64_MIN,
                                          "3F2504E0-4F89-41D3-9A0C-0305E82C3301", tok, sizeof tok),
                     0);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, "", tok, &at, out), 0);
    assert_true(at == INT64_MIN);
    assert_string_equal(out, id);
}

static void test_encode_refuses_bad_input(void **state)
{
    (void)state;
    char tok[SRV_PAGETOKEN_LEN + 1];
    assert_int_equal(srv_pagetoken_encode(key, KEYLEN, scope, 1, id, tok, sizeof tok - 1), -1);
    assert_int_equal(srv_pagetoken_encode(key, 0, scope, 1, id, tok, sizeof tok), -1);
    assert_int_equal(srv_pagetoken_encode(key, KEYLEN, scope, 1, "not-a-uuid", tok, sizeof tok),
                     -1);
    assert_int_equal(srv_pagetoken_encode(key, KEYLEN, scope, 1,
                                          "3f2504e0-4f89-41d3-9a0c-0305e82c33010", tok, sizeof tok),
                     -1);
    assert_int_equal(srv_pagetoken_encode(key, KEYLEN, scope, 1,
                                          "3f2504e0x4f89-41d3-9a0c-0305e82c3301", tok, sizeof tok),
                     -1);
    assert_int_equal(srv_pagetoken_encode(key, KEYLEN, scope, 1,
                                          "3f2504e0-4f89-41d3-9a0c-0305e82c330", tok, sizeof tok),
                     -1);
}

/* Any single changed character anywhere is refused, and so is every truncation. */
static void test_any_change_is_refused(void **state)
{
    (void)state;
    char tok[SRV_PAGETOKEN_LEN + 1], bad[SRV_PAGETOKEN_LEN + 1];
    make(tok);
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ .";
    int64_t at = 42;
    char out[37] = "untouched";
    for (size_t i = 0; i < SRV_PAGETOKEN_LEN; i++) {
        for (const char *c = alphabet; *c; c++) {
            if (*c == tok[i])
                continue;
            memcpy(bad, tok, sizeof bad);
            bad[i] = *c;
            assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, bad, &at, out), -1);
        }
    }
    for (size_t n = 0; n < SRV_PAGETOKEN_LEN; n++) {
        memcpy(bad, tok, sizeof bad);
        bad[n] = '\0';
        assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, bad, &at, out), -1);
    }
    assert_int_equal(at, 42);
    assert_string_equal(out, "untouched");
}

/* A flipped bit in the decoded bytes, re-encoded into valid base64url: the MAC catches it. */
static void test_flipped_byte_is_refused(void **state)
{
    (void)state;
    char tok[SRV_PAGETOKEN_LEN + 1], bad[SRV_PAGETOKEN_LEN + 1];
    make(tok);
    unsigned char raw[64];
    long n = srv__b64url_decode(tok, SRV_PAGETOKEN_LEN, raw, sizeof raw);
    assert_int_equal(n, 41);
    int64_t at;
    char out[37];
    for (long i = 0; i < n; i++) {
        for (int bit = 0; bit < 8; bit++) {
            raw[i] ^= (unsigned char)(1u << bit);
            assert_int_equal(srv__b64url_encode(raw, (size_t)n, bad, sizeof bad),
                             SRV_PAGETOKEN_LEN);
            assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, bad, &at, out), -1);
            raw[i] ^= (unsigned char)(1u << bit);
        }
    }
}

static void test_other_scope_or_key_is_refused(void **state)
{
    (void)state;
    char tok[SRV_PAGETOKEN_LEN + 1];
    make(tok);
    int64_t at;
    char out[37];
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, "c=bob;s=1,2", tok, &at, out), -1);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, "c=alice;s=1", tok, &at, out), -1);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, "", tok, &at, out), -1);
    static const unsigned char other[] = "0123456789abcdef0123456789abcdeF";
    assert_int_equal(srv_pagetoken_decode(other, KEYLEN, scope, tok, &at, out), -1);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN - 1, scope, tok, &at, out), -1);
    assert_int_equal(srv_pagetoken_decode(key, 0, scope, tok, &at, out), -1);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, tok, &at, out), 0);
}

static void test_garbage_is_refused(void **state)
{
    (void)state;
    char tok[SRV_PAGETOKEN_LEN + 1];
    make(tok);
    int64_t at;
    char out[37];
    const char *garbage[] = {"", "x", "====", "not a token at all",
                             "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"};
    for (size_t i = 0; i < sizeof garbage / sizeof garbage[0]; i++)
        assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, garbage[i], &at, out), -1);

    /* a valid token with anything appended */
    char longer[SRV_PAGETOKEN_LEN + 8];
    snprintf(longer, sizeof longer, "%sA", tok);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, longer, &at, out), -1);
    snprintf(longer, sizeof longer, "%s=", tok);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, longer, &at, out), -1);

    size_t huge = 1 << 20;
    char *big = malloc(huge + 1);
    assert_non_null(big);
    memset(big, 'A', huge);
    big[huge] = '\0';
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, big, &at, out), -1);
    free(big);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, NULL, &at, out), -1);
}

/* Seals raw[0..25) as pagetoken.h documents: HMAC-SHA256(key, SHA-256(scope) | payload). */
static void reseal(unsigned char raw[41], const char *sc)
{
    unsigned char input[32 + 25], mac[EVP_MAX_MD_SIZE];
    unsigned int maclen;
    SHA256((const unsigned char *)sc, strlen(sc), input);
    memcpy(input + 32, raw, 25);
    HMAC(EVP_sha256(), key, KEYLEN, input, sizeof input, mac, &maclen);
    memcpy(raw + 25, mac, 16);
}

/* The format is the documented one, and a well-sealed token of another version is refused. */
static void test_documented_format_and_unknown_version(void **state)
{
    (void)state;
    char tok[SRV_PAGETOKEN_LEN + 1], again[SRV_PAGETOKEN_LEN + 1];
    make(tok);
    unsigned char raw[64];
    assert_int_equal(srv__b64url_decode(tok, SRV_PAGETOKEN_LEN, raw, sizeof raw), 41);
    assert_int_equal(raw[0], 1);
    reseal(raw, scope);
    srv__b64url_encode(raw, 41, again, sizeof again);
    assert_string_equal(again, tok);

    int64_t at;
    char out[37];
    raw[0] = 2;
    reseal(raw, scope);
    srv__b64url_encode(raw, 41, again, sizeof again);
    assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, again, &at, out), -1);
}

/* Bounded, deterministic random input: decode answers -1 and never crashes. */
static void test_fuzz_decode(void **state)
{
    (void)state;
    srand(4242);
    char buf[128];
    int64_t at;
    char out[37];
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for (int iter = 0; iter < 20000; iter++) {
        size_t n = (size_t)(rand() % 100);
        bool b64 = rand() % 2;
        for (size_t i = 0; i < n; i++)
            buf[i] = b64 ? alphabet[rand() % 64] : (char)(1 + rand() % 255);
        buf[n] = '\0';
        assert_int_equal(srv_pagetoken_decode(key, KEYLEN, scope, buf, &at, out), -1);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_encode_refuses_bad_input),
        cmocka_unit_test(test_any_change_is_refused),
        cmocka_unit_test(test_flipped_byte_is_refused),
        cmocka_unit_test(test_other_scope_or_key_is_refused),
        cmocka_unit_test(test_garbage_is_refused),
        cmocka_unit_test(test_documented_format_and_unknown_version),
        cmocka_unit_test(test_fuzz_decode),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
