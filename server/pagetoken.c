/* pagetoken.c — ListOrders cursors sealed with HMAC-SHA256; see pagetoken.h.
 *
 * The scope is hashed first so that the MAC input has a fixed shape whatever the scope's
 * length (and no separator to get wrong). The MAC is checked in constant time before any
 * field of the payload is believed.
 */
#include "server/pagetoken.h"

#include <stdbool.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "server/auth.h" /* srv__b64url_* */

#define VERSION     1
#define PAYLOAD_LEN (1 + 8 + 16)
#define MAC_LEN     16
#define RAW_LEN     (PAYLOAD_LEN + MAC_LEN)

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Canonical 8-4-4-4-12 text to 16 bytes. */
static bool uuid_parse(const char *s, unsigned char out[16])
{
    size_t o = 0;
    for (size_t i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (s[i] != '-')
                return false;
            continue;
        }
        int hi = hexval(s[i]);
        int lo = hi < 0 ? -1 : hexval(s[++i]);
        if (lo < 0)
            return false;
        out[o++] = (unsigned char)(hi << 4 | lo);
    }
    return s[36] == '\0';
}

static void uuid_format(const unsigned char in[16], char out[37])
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (size_t i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[in[i] >> 4];
        out[o++] = hex[in[i] & 15];
    }
    out[o] = '\0';
}

static bool seal(const unsigned char *key, size_t keylen, const char *scope,
                 const unsigned char payload[PAYLOAD_LEN], unsigned char mac[MAC_LEN])
{
    unsigned char input[SHA256_DIGEST_LENGTH + PAYLOAD_LEN];
    unsigned char full[EVP_MAX_MD_SIZE];
    unsigned int fulllen = 0;
    if (!SHA256((const unsigned char *)scope, strlen(scope), input)) {
        ERR_clear_error();
        return false;
    }
    memcpy(input + SHA256_DIGEST_LENGTH, payload, PAYLOAD_LEN);
    if (!HMAC(EVP_sha256(), key, (int)keylen, input, sizeof input, full, &fulllen)) {
        ERR_clear_error();
        return false;
    }
    memcpy(mac, full, MAC_LEN);
    return true;
}

int srv_pagetoken_encode(const unsigned char *key, size_t keylen, const char *scope,
                         int64_t created_at_us, const char *order_id, char *out, size_t cap)
{
    unsigned char raw[RAW_LEN];
    if (!key || keylen == 0 || keylen > 65536 || !scope || !order_id || cap < SRV_PAGETOKEN_LEN + 1)
        return -1;
    raw[0] = VERSION;
    uint64_t t = (uint64_t)created_at_us;
    for (int i = 0; i < 8; i++)
        raw[1 + i] = (unsigned char)(t >> (56 - 8 * i));
    if (!uuid_parse(order_id, raw + 9))
        return -1;
    if (!seal(key, keylen, scope, raw, raw + PAYLOAD_LEN))
        return -1;
    return srv__b64url_encode(raw, RAW_LEN, out, cap) == SRV_PAGETOKEN_LEN ? 0 : -1;
}

int srv_pagetoken_decode(const unsigned char *key, size_t keylen, const char *scope,
                         const char *token, int64_t *created_at_us, char order_id[37])
{
    unsigned char raw[RAW_LEN], mac[MAC_LEN];
    if (!key || keylen == 0 || keylen > 65536 || !scope || !token)
        return -1;
    /* strnlen: a huge input is refused without being read to its end. */
    if (strnlen(token, SRV_PAGETOKEN_LEN + 1) != SRV_PAGETOKEN_LEN)
        return -1;
    if (srv__b64url_decode(token, SRV_PAGETOKEN_LEN, raw, sizeof raw) != RAW_LEN)
        return -1;
    if (!seal(key, keylen, scope, raw, mac) || CRYPTO_memcmp(mac, raw + PAYLOAD_LEN, MAC_LEN) != 0)
        return -1;
    if (raw[0] != VERSION) /* authentic, but from a format this build does not know */
        return -1;
    uint64_t t = 0;
    for (int i = 0; i < 8; i++)
        t = t << 8 | raw[1 + i];
    *created_at_us = (int64_t)t;
    uuid_format(raw + 9, order_id);
    return 0;
}
