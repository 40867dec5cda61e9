/* currency.c — amounts as the providers want them, from orderd's ISO-4217 minor units and
 * back, exactly (integer arithmetic only), and the RFC 3339 timestamps PayPal sends.
 *
 * Stripe counts in "the smallest currency unit", which is not always ISO's minor unit:
 * - its zero-decimal currencies (BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF
 *   XOF XPF) are whole units. For all but MGA, ISO's exponent is 0 too, so the number is
 *   unchanged (JPY 1200 minor = 1200 yen). MGA has exponent 2 in ISO: 12300 minor units
 *   (123.00 Ar) are sent as 123, and an amount with a fraction of an ariary is not
 *   representable.
 * - ISK is zero-decimal in ISO but Stripe, for backwards compatibility, takes it as a
 *   two-decimal amount whose last two digits are 00: ISK 500 is sent as 50000.
 * - HUF and TWD are two-decimal for charges (Stripe's zero-decimal rule for them applies
 *   to payouts only), as in ISO: sent unchanged.
 * - BHD JOD KWD OMR TND are three-decimal, as in ISO, but Stripe refuses a last digit
 *   other than 0: such amounts are not representable (orderd does not round money).
 * PayPal takes a decimal string in major units; JPY, HUF and TWD take no decimals, so a
 * HUF or TWD amount with fillér / cents is not representable.
 */
#include "payments/httpc.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static const char *const stripe_zero_decimal[] = {
    "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA",
    "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF",
};
static const char *const stripe_three_decimal[] = {"BHD", "JOD", "KWD", "OMR", "TND"};
static const char *const paypal_no_decimal[] = {"HUF", "JPY", "TWD"};

static bool in(const char *code, const char *const *set, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(code, set[i]) == 0)
            return true;
    return false;
}
#define IN(code, set) in(code, set, sizeof set / sizeof *set)

bool pay__currency_case(const char *src, char out[4], bool upper)
{
    if (!src || strlen(src) != 3)
        return false;
    for (int i = 0; i < 3; i++) {
        unsigned char c = (unsigned char)src[i];
        if (!isalpha(c))
            return false;
        out[i] = (char)(upper ? toupper(c) : tolower(c));
    }
    out[3] = '\0';
    return true;
}

static int stripe_exponent(const char *iso)
{
    int e = money_currency_exponent(iso);
    if (e < 0)
        return -1;
    if (IN(iso, stripe_zero_decimal))
        return 0;
    if (strcmp(iso, "ISK") == 0)
        return 2;
    return e;
}

static int paypal_exponent(const char *iso)
{
    int e = money_currency_exponent(iso);
    if (e < 0)
        return -1;
    return IN(iso, paypal_no_decimal) ? 0 : e;
}

static int64_t pow10i(int n)
{
    int64_t p = 1;
    while (n-- > 0)
        p *= 10;
    return p;
}

/* v in units of 10^-from to units of 10^-to, exactly. */
static bool rescale(int64_t v, int from, int to, int64_t *out)
{
    if (to >= from)
        return !__builtin_mul_overflow(v, pow10i(to - from), out);
    int64_t d = pow10i(from - to);
    if (v % d != 0)
        return false;
    *out = v / d;
    return true;
}

bool pay__stripe_amount(const char *iso_currency, int64_t minor, int64_t *out)
{
    char iso[4];
    if (!pay__currency_case(iso_currency, iso, true))
        return false;
    int ie = money_currency_exponent(iso), se = stripe_exponent(iso);
    if (ie < 0 || se < 0 || minor < 0 || !rescale(minor, ie, se, out))
        return false;
    if (IN(iso, stripe_three_decimal) && *out % 10 != 0)
        return false;
    return true;
}

bool pay__stripe_to_minor(const char *currency, int64_t amount, int64_t *out)
{
    char iso[4];
    if (!pay__currency_case(currency, iso, true))
        return false;
    int ie = money_currency_exponent(iso), se = stripe_exponent(iso);
    return ie >= 0 && se >= 0 && amount >= 0 && rescale(amount, se, ie, out);
}

bool pay__paypal_value(const char *iso_currency, int64_t minor, char *out, size_t cap)
{
    char iso[4];
    int64_t v;
    if (!pay__currency_case(iso_currency, iso, true))
        return false;
    int ie = money_currency_exponent(iso), pe = paypal_exponent(iso);
    if (ie < 0 || pe < 0 || minor < 0 || !rescale(minor, ie, pe, &v))
        return false;
    int64_t unit = pow10i(pe);
    int n;
    if (pe == 0)
        n = snprintf(out, cap, "%lld", (long long)v);
    else
        n = snprintf(out, cap, "%lld.%0*lld", (long long)(v / unit), pe, (long long)(v % unit));
    return n > 0 && (size_t)n < cap;
}

bool pay__paypal_parse_value(const char *iso_currency, const char *value, int64_t *out)
{
    char iso[4];
    if (!value || !pay__currency_case(iso_currency, iso, true))
        return false;
    int ie = money_currency_exponent(iso);
    if (ie < 0)
        return false;
    /* Read it as an integer count of 10^-ie units: "12.3" EUR -> 1230. */
    const char *p = value;
    int64_t v = 0;
    int frac = -1; /* digits after the point, -1 = no point yet */
    bool digits = false;
    for (; *p; p++) {
        if (*p == '.' && frac < 0) {
            frac = 0;
            continue;
        }
        if (*p < '0' || *p > '9')
            return false;
        int d = *p - '0';
        digits = true;
        if (frac >= 0 && frac >= ie) {
            if (d != 0)
                return false; /* a fraction of a minor unit */
            continue;
        }
        if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, d, &v))
            return false;
        if (frac >= 0)
            frac++;
    }
    if (!digits || frac == 0)
        return false;
    int have = frac < 0 ? 0 : frac;
    return !__builtin_mul_overflow(v, pow10i(ie - have), out);
}

static bool num(const char **p, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        char c = (*p)[i];
        if (c < '0' || c > '9')
            return false;
        v = v * 10 + (c - '0');
    }
    *p += n;
    *out = v;
    return true;
}

bool pay__rfc3339_us(const char *s, int64_t *out)
{
    if (!s)
        return false;
    const char *p = s;
    int Y, M, D, h, m, sec;
    if (!num(&p, 4, &Y) || *p++ != '-' || !num(&p, 2, &M) || *p++ != '-' || !num(&p, 2, &D))
        return false;
    if (*p != 'T' && *p != 't' && *p != ' ')
        return false;
    p++;
    if (!num(&p, 2, &h) || *p++ != ':' || !num(&p, 2, &m) || *p++ != ':' || !num(&p, 2, &sec))
        return false;
    int64_t us = 0;
    if (*p == '.') {
        p++;
        int n = 0;
        while (*p >= '0' && *p <= '9') {
            if (n < 6)
                us = us * 10 + (*p - '0');
            n++;
            p++;
        }
        if (n == 0)
            return false;
        for (; n < 6; n++)
            us *= 10;
    }
    int offset_s = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int sign = *p++ == '-' ? -1 : 1, oh, om;
        if (!num(&p, 2, &oh) || *p++ != ':' || !num(&p, 2, &om) || oh > 23 || om > 59)
            return false;
        offset_s = sign * (oh * 3600 + om * 60);
    } else {
        return false;
    }
    if (*p || M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || sec > 60)
        return false;
    struct tm tm = {.tm_year = Y - 1900,
                    .tm_mon = M - 1,
                    .tm_mday = D,
                    .tm_hour = h,
                    .tm_min = m,
                    .tm_sec = sec};
    time_t t = timegm(&tm);
    if (t == (time_t)-1 && !(Y == 1969 && M == 12 && D == 31))
        return false;
    *out = ((int64_t)t - offset_s) * 1000000 + us;
    return true;
}
