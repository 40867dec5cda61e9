#!/usr/bin/python3
"""fake_paypal.py - a local fake of the PayPal REST APIs orderd uses (OAuth2 client
credentials, Orders v2, Payments v2 captures/refunds, webhook signature verification).

Run:    /usr/bin/python3 tests/fakes/fake_paypal.py --port 0 \
            [--client-id cid --client-secret csecret --webhook-id WH-1]
        (first stdout line: "LISTENING <port>"; SIGTERM/SIGINT exits cleanly)
Import: FakePayPal(...).start() -> port ... .stop();
        sign_webhook(transmission_id, transmission_time, webhook_id, event_obj)

Faithful to PayPal (developer.paypal.com):
  * POST /v1/oauth2/token with Basic client_id:secret and grant_type=client_credentials;
    401 {"error":"invalid_client",...}; every other call needs a valid, unexpired Bearer
    token, else 401 AUTHENTICATION_FAILURE.
  * Error bodies {name, message, debug_id, details:[{field?, value?, location?, issue,
    description}], links}; a Paypal-Debug-Id header on every API answer.
  * Orders: intent CAPTURE, amount value a decimal string; JPY/HUF/TWD with decimals ->
    422 DECIMALS_NOT_SUPPORTED, more than 2 decimals -> 422 DECIMAL_PRECISION. 201 with
    id/status/links (approve, or payer-action when payment_source.paypal.
    experience_context is sent -> PAYER_ACTION_REQUIRED); Prefer: return=representation
    returns the full resource. Capture -> 201, order COMPLETED with
    purchase_units[0].payments.captures[0]; 422 ORDER_NOT_APPROVED,
    ORDER_ALREADY_CAPTURED, INSTRUMENT_DECLINED (with a "redirect" link back to approval).
  * PayPal-Request-Id (create, capture, refund): a repeat returns the LATEST state of
    what the first request created, with HTTP 200 (first time 201). Errors are not
    remembered, so a retry after a 5xx/422 runs again. Scope: request path + id.
  * Refunds: 201 {id,status,links}; CAPTURE_FULLY_REFUNDED, REFUND_AMOUNT_EXCEEDED;
    the capture becomes PARTIALLY_REFUNDED / REFUNDED.
  * Webhook events shaped like PayPal's (WH-... id, event_version 1.0, resource_type,
    resource with custom_id and supplementary_data.related_ids.order_id; refunds link
    "up" to the capture), delivered with the PAYPAL-* transmission headers.

Simplified / fake-only:
  * Signatures cannot use PayPal's RSA certificates. verify-webhook-signature answers
    SUCCESS iff auth_algo == "SHA256withRSA", cert_url is an https URL on a paypal.com
    host, webhook_id equals the configured one, and transmission_sig ==
    base64(HMAC-SHA256(b"fake-paypal-signing-key",
        f"{transmission_id}|{transmission_time}|{webhook_id}|{crc32(canonical)}")),
    canonical = json.dumps(webhook_event, sort_keys=True, separators=(",", ":"),
    ensure_ascii=True) encoded UTF-8, crc32 unsigned decimal. So the event object can be
    re-serialised freely by the caller; only its content matters.
  * STRICT amounts by default: non zero-decimal currencies need EXACTLY 2 decimals
    ("10.00"); real PayPal also accepts "10" and "10.5". /_fake/config
    {"strict_decimals": false} restores PayPal's rule. Zero amounts are not rejected.
  * One purchase unit, intent CAPTURE only (AUTHORIZE -> 400), no PATCH, no vaulting,
    no invoice_id uniqueness check, no seller fee breakdowns. Each token grant issues a
    new token. 415 UNSUPPORTED_MEDIA_TYPE for a non-JSON Content-Type on JSON POSTs
    (libcurl's default for a POST body is form-encoded) - the body shape is assumed.
  * A capture outcome forced with /_fake/capture_outcome sticks until changed
    (status "COMPLETED" restores the default). /_fake/event for PAYMENT.CAPTURE.COMPLETED
    / DENIED / PENDING also moves the capture to COMPLETED / DECLINED / PENDING (as the
    provider would have before sending it).
"""

import base64
import copy
import hashlib
import hmac
import json
import os
import re
import sys
import time
import uuid
import zlib
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakebase import UPPER_ALNUM, FakeError, FakeServer, common_args, parse_nested, rand_id, run_main  # noqa: E402

SIGNING_KEY = b"fake-paypal-signing-key"
CERT_URL = "https://api.paypal.com/v1/notifications/certs/CERT-fake"
DEFAULT_TTL = 32400
NO_DECIMALS = ("JPY", "HUF", "TWD")
CURRENCIES = set("AUD BRL CAD CNY CZK DKK EUR HKD HUF ILS JPY MYR MXN TWD NZD NOK PHP PLN GBP SGD "
                 "SEK CHF THB USD".split())
INFLIGHT = "in-flight"
MSG_400 = "Request is not well-formed, syntactically incorrect, or violates schema."
MSG_422 = "The requested action could not be performed, semantically incorrect, or failed business validation."
AUTH_FAILURE = {"name": "AUTHENTICATION_FAILURE",
                "message": "Authentication failed due to invalid authentication credentials or a missing "
                           "Authorization header.",
                "links": [{"href": "https://developer.paypal.com/docs/api/overview/#error",
                           "rel": "information_link"}]}


def canonical_json(event_obj):
    if isinstance(event_obj, (bytes, str)):
        event_obj = json.loads(event_obj)
    return json.dumps(event_obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sign_webhook(transmission_id, transmission_time, webhook_id, event_obj):
    """The fake's PAYPAL-TRANSMISSION-SIG for an event (a dict, or its JSON text)."""
    crc = zlib.crc32(canonical_json(event_obj).encode("utf-8")) & 0xFFFFFFFF
    msg = f"{transmission_id}|{transmission_time}|{webhook_id}|{crc}".encode()
    return base64.b64encode(hmac.new(SIGNING_KEY, msg, hashlib.sha256).digest()).decode()


def now_rfc3339(ms=False):
    t = time.time()
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
    return f"{base}.{int(t * 1000) % 1000:03d}Z" if ms else base + "Z"


def pp_err(status, name, message, issue=None, description=None, field=None, value=None,
           location="body", api="orders", links=None):
    body = {"name": name, "message": message, "debug_id": rand_id(13, "0123456789abcdef")}
    if issue:
        detail = {}
        if field:
            detail.update(field=field, location=location)
        if value is not None:
            detail["value"] = value
        detail.update(issue=issue, description=description or issue)
        body["details"] = [detail]
        body["links"] = (links or []) + [{"href": f"https://developer.paypal.com/docs/api/{api}/v2/#error-{issue}",
                                          "rel": "information_link", "method": "GET"}]
    return FakeError(status, body, headers={"Paypal-Debug-Id": body["debug_id"]})


def bad_request(issue, description, field=None, value=None, location="body"):
    return pp_err(400, "INVALID_REQUEST", MSG_400, issue, description, field, value, location)


def unprocessable(issue, description, field=None, value=None, api="orders", links=None):
    return pp_err(422, "UNPROCESSABLE_ENTITY", MSG_422, issue, description, field, value, api=api, links=links)


def not_found(field, value, api="orders"):
    return pp_err(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.", "INVALID_RESOURCE_ID",
                  "Specified resource ID does not exist. Please check the resource ID and try again.",
                  field, value, "path", api)


def decimals_of(cc):
    return 0 if cc in NO_DECIMALS else 2


def to_minor(value, cc):
    whole, _, frac = value.partition(".")
    d = decimals_of(cc)
    return int(whole) * 10 ** d + int((frac + "00")[:d] or 0)


def fmt_amount(minor, cc):
    d = decimals_of(cc)
    return str(minor) if d == 0 else f"{minor // 100}.{minor % 100:02d}"


class FakePayPal(FakeServer):
    name = "fake-paypal"

    def __init__(self, client_id="cid", client_secret="csecret", webhook_id="WH-1", **kw):
        self._initial = {"client_id": client_id, "client_secret": client_secret, "webhook_id": webhook_id,
                         "token_ttl": DEFAULT_TTL, "strict_decimals": True}
        super().__init__(**kw)

    def reset_state(self):
        for k, v in self._initial.items():
            setattr(self, k, v)
        self.tokens = {}           # access token -> expiry (unix time)
        self.token_grants = 0
        self.reqids = {}           # (path, PayPal-Request-Id) -> INFLIGHT | (kind, id)
        self.kinds = {}            # object id -> "order" | "capture" | "refund"
        self.order_capture = {}    # order id -> capture id
        self.capture_parent = {}   # capture id -> order id
        self.capture_refunds = {}  # capture id -> [refund ids]
        self.outcomes = {}         # order id -> (status, reason)

    def configure(self, data):
        for k, v in data.items():
            if k == "revoke_tokens":
                if v:
                    self.tokens.clear()
            elif k in self._initial:
                setattr(self, k, v)
            else:
                raise FakeError(400, {"error": f"unknown config key {k}"})

    def config_view(self):
        return {k: getattr(self, k) for k in self._initial}

    def injected_error(self, mode):
        dbg = rand_id(13, "0123456789abcdef")
        hdrs = {"Paypal-Debug-Id": dbg}
        if mode == "429":
            return 429, {"name": "RATE_LIMIT_REACHED", "message": "Too many requests. Blocked due to rate limiting.",
                         "debug_id": dbg}, hdrs
        if mode == "409":
            return 409, {"name": "RESOURCE_CONFLICT", "message": "The server has detected a conflict while "
                         "processing this request.", "debug_id": dbg,
                         "details": [{"issue": "PREVIOUS_REQUEST_IN_PROGRESS", "description": "A previous request "
                                      "on this resource is currently in progress. Please wait for some time and "
                                      "try again."}]}, hdrs
        return 500, {"name": "INTERNAL_SERVER_ERROR", "message": "An internal server error has occurred.",
                     "debug_id": dbg, "links": [{"href": "https://developer.paypal.com/docs/api/orders/v2/"
                                                 "#error-INTERNAL_SERVER_ERROR", "rel": "information_link"}]}, hdrs

    # ---- request pipeline --------------------------------------------------
    ROUTES = [
        ("POST", r"/v2/checkout/orders", "create_order", True),
        ("GET", r"/v2/checkout/orders/([^/]+)", "get_order", False),
        ("POST", r"/v2/checkout/orders/([^/]+)/capture", "capture_order", True),
        ("POST", r"/v2/payments/captures/([^/]+)/refund", "refund_capture", True),
        ("GET", r"/v2/payments/captures/([^/]+)", "get_capture", False),
        ("GET", r"/v2/payments/refunds/([^/]+)", "get_refund", False),
        ("POST", r"/v1/notifications/verify-webhook-signature", "verify_webhook", False),
    ]

    def handle(self, req):
        headers = {"Paypal-Debug-Id": rand_id(13, "0123456789abcdef")}
        try:
            if req.path == "/v1/oauth2/token" and req.method == "POST":
                with self.lock:
                    return 200, self.token(req), headers
            self._auth(req)
            for method, pattern, fn, idempotent in self.ROUTES:
                m = re.fullmatch(pattern, req.path)
                if m and method == req.method:
                    if idempotent:
                        status, body = self._idempotent(req, getattr(self, fn), *m.groups())
                    else:
                        self.pause(req)
                        with self.lock:
                            status, body = 200, getattr(self, fn)(req, *m.groups())
                    return status, body, headers
            raise pp_err(404, "RESOURCE_NOT_FOUND", "The specified resource does not exist.", "INVALID_RESOURCE_ID",
                         f"No route for {req.method} {req.path}.")
        except FakeError as e:
            return e.status, e.body, {**headers, **e.headers}

    def token(self, req):
        user, _, pw = "", "", ""
        scheme, _, cred = req.header("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, pw = base64.b64decode(cred.strip()).decode().partition(":")
            except ValueError:
                pass
        if not (user == self.client_id and pw == self.client_secret):
            raise FakeError(401, {"error": "invalid_client", "error_description": "Client Authentication failed"})
        grant = parse_nested(req.text).get("grant_type") or req.query.get("grant_type")
        if grant != "client_credentials":
            raise FakeError(400, {"error": "unsupported_grant_type",
                                  "error_description": "Grant Type is NULL" if grant is None else "unsupported grant_type"})
        tok = "A21AA" + rand_id(92, UPPER_ALNUM + "abcdefghijklmnopqrstuvwxyz-_")
        self.tokens[tok] = time.time() + int(self.token_ttl)
        self.token_grants += 1
        return {"scope": "https://uri.paypal.com/services/payments/refund https://uri.paypal.com/services/"
                         "payments/payment/authcapture https://uri.paypal.com/services/applications/webhooks",
                "access_token": tok, "token_type": "Bearer", "app_id": "APP-80W284485P519543T",
                "expires_in": int(self.token_ttl), "nonce": now_rfc3339() + rand_id(43)}

    def _auth(self, req):
        scheme, _, tok = req.header("authorization", "").partition(" ")
        with self.lock:
            ok = scheme == "Bearer" and self.tokens.get(tok.strip(), 0) > time.time()
        if not ok:
            raise FakeError(401, copy.deepcopy(AUTH_FAILURE))

    def _idempotent(self, req, fn, *args):
        rid = req.header("paypal-request-id")
        key = (req.path, rid)
        if rid:
            with self.lock:
                ent = self.reqids.get(key)
                if ent == INFLIGHT:
                    status, body, _ = self.injected_error("409")
                    raise FakeError(409, body)
                if ent is not None:
                    return 200, self._render(ent, req)
                self.reqids[key] = INFLIGHT
        try:
            self.pause(req)
            with self.lock:
                status, ref = fn(req, *args)
        except BaseException:
            if rid:
                with self.lock:
                    del self.reqids[key]
            raise
        with self.lock:
            if rid:
                self.reqids[key] = ref
            return status, self._render(ref, req)

    def _json_body(self, req, required=True):
        ctype = req.header("content-type", "")
        if not ctype.lower().startswith("application/json"):
            raise pp_err(415, "UNSUPPORTED_MEDIA_TYPE", "The requested resource does not support the content type "
                         "provided.", "UNSUPPORTED_MEDIA_TYPE", f"The API does not support the content-type "
                         f"'{ctype}'. Use application/json.")
        try:
            body = req.json()
        except ValueError:
            raise bad_request("MALFORMED_REQUEST_JSON", "The request JSON is not well formed.")
        if body is None and not required:
            return {}
        if not isinstance(body, dict):
            raise bad_request("MALFORMED_REQUEST_JSON", "The request JSON is not well formed.")
        return body

    def _amount(self, amt, field):
        if not isinstance(amt, dict):
            raise bad_request("MISSING_REQUIRED_PARAMETER", "A required field / parameter is missing.", field)
        cc, value = amt.get("currency_code"), amt.get("value")
        if cc is None or value is None:
            missing = "currency_code" if cc is None else "value"
            raise bad_request("MISSING_REQUIRED_PARAMETER", "A required field / parameter is missing.",
                              f"{field}/{missing}")
        if not isinstance(cc, str) or not re.fullmatch(r"[A-Z]{3}", cc):
            raise bad_request("INVALID_PARAMETER_VALUE", "The value of a field is invalid.",
                              f"{field}/currency_code", str(cc))
        if cc not in CURRENCIES:
            raise unprocessable("CURRENCY_NOT_SUPPORTED", "Currency code is not currently supported. Please refer "
                                "https://developer.paypal.com/api/rest/reference/currency-codes/ for list of "
                                "supported currency codes.", f"{field}/currency_code", cc)
        if not isinstance(value, str) or not re.fullmatch(r"\d{1,10}(\.\d+)?", value):
            raise bad_request("INVALID_PARAMETER_SYNTAX", "The value of a field does not conform to the expected "
                              "format.", f"{field}/value", str(value))
        frac = value.partition(".")[2]
        if cc in NO_DECIMALS and "." in value:
            raise unprocessable("DECIMALS_NOT_SUPPORTED", "Currency does not support decimals.", f"{field}/value", value)
        if len(frac) > 2 or (self.strict_decimals and cc not in NO_DECIMALS and len(frac) != 2):
            raise unprocessable("DECIMAL_PRECISION", "If the currency supports decimals, only two decimal place "
                                "precision is supported." + ("" if len(frac) > 2 else " (fake, strict: send "
                                                            "exactly two decimals)"), f"{field}/value", value)
        return cc, to_minor(value, cc)

    # ---- rendering -----------------------------------------------------------
    def _order_links(self, o):
        self_link = {"href": f"{self.base_url}/v2/checkout/orders/{o['id']}", "rel": "self", "method": "GET"}
        checkout = f"https://www.sandbox.paypal.com/checkoutnow?token={o['id']}"
        update = {"href": self_link["href"], "rel": "update", "method": "PATCH"}
        capture = {"href": self_link["href"] + "/capture", "rel": "capture", "method": "POST"}
        return {"CREATED": [self_link, {"href": checkout, "rel": "approve", "method": "GET"}, update, capture],
                "PAYER_ACTION_REQUIRED": [self_link, {"href": checkout, "rel": "payer-action", "method": "GET"}],
                "APPROVED": [self_link, update, capture]}.get(o["status"], [self_link])

    def _payments(self, o):
        cap_id = self.order_capture.get(o["id"])
        if not cap_id:
            return None
        cap = copy.deepcopy(self.objects[cap_id])
        cap.pop("supplementary_data", None)
        pay = {"captures": [cap]}
        refunds = [copy.deepcopy(self.objects[r]) for r in self.capture_refunds.get(cap_id, [])]
        if refunds:
            pay["refunds"] = refunds
        return pay

    def order_view(self, o, full=True):
        out = copy.deepcopy(o)
        pay = self._payments(o)
        if pay:
            out["purchase_units"][0]["payments"] = pay
        out["links"] = self._order_links(o)
        if full:
            return out
        keep = ("id", "status", "payment_source", "purchase_units", "payer", "links") if pay else ("id", "status", "links")
        out = {k: out[k] for k in keep if k in out}
        if pay:
            out["purchase_units"] = [{"reference_id": o["purchase_units"][0]["reference_id"], "payments": pay}]
        return out

    def _render(self, ref, req):
        kind, oid = ref
        full = "return=representation" in req.header("prefer", "")
        if kind in ("order", "capture"):
            return self.order_view(self.objects[oid], full)
        refund = copy.deepcopy(self.objects[oid])
        return refund if full else {k: refund[k] for k in ("id", "status", "links")}

    # ---- endpoints (called with self.lock held) --------------------------------
    def create_order(self, req):
        body = self._json_body(req)
        intent = body.get("intent")
        if intent is None:
            raise bad_request("MISSING_REQUIRED_PARAMETER", "A required field / parameter is missing.", "/intent")
        if intent != "CAPTURE":
            raise bad_request("INVALID_PARAMETER_VALUE", "The value of a field is invalid (this fake supports "
                              "intent CAPTURE only).", "/intent", str(intent))
        pus = body.get("purchase_units")
        if not isinstance(pus, list) or not pus:
            raise bad_request("MISSING_REQUIRED_PARAMETER", "A required field / parameter is missing.", "/purchase_units")
        if len(pus) > 1 or not isinstance(pus[0], dict):
            raise bad_request("INVALID_PARAMETER_VALUE", "This fake supports exactly one purchase unit.",
                              "/purchase_units")
        pu = pus[0]
        ref_id = pu.get("reference_id", "default")
        field = f"/purchase_units/@reference_id=='{ref_id}'"
        cc, _ = self._amount(pu.get("amount"), field + "/amount")
        unit = {"reference_id": ref_id, "amount": {"currency_code": cc, "value": pu["amount"]["value"]},
                "payee": {"email_address": "merchant@example.com", "merchant_id": "FAKEMERCHANT01"}}
        for name in ("custom_id", "invoice_id", "description", "soft_descriptor"):
            if name in pu:
                if not isinstance(pu[name], str) or len(pu[name]) > 127:
                    raise bad_request("INVALID_STRING_MAX_LENGTH", "The value of a field is too long.",
                                      f"{field}/{name}", str(pu[name]))
                unit[name] = pu[name]
        oid = rand_id(17, UPPER_ALNUM)
        order = {"id": oid, "intent": "CAPTURE", "status": "CREATED", "purchase_units": [unit],
                 "create_time": now_rfc3339()}
        ps = body.get("payment_source")
        if isinstance(ps, dict) and "paypal" in ps:
            order["status"] = "PAYER_ACTION_REQUIRED"
            order["payment_source"] = {"paypal": {}}
        self.objects[oid] = order
        self.kinds[oid] = "order"
        return 201, ("order", oid)

    def _order(self, oid):
        if self.kinds.get(oid) != "order":
            raise not_found("order_id", oid)
        return self.objects[oid]

    def get_order(self, req, oid):
        return self.order_view(self._order(oid))

    def capture_order(self, req, oid):
        self._json_body(req, required=False)
        o = self._order(oid)
        if o["status"] == "COMPLETED":
            raise unprocessable("ORDER_ALREADY_CAPTURED", "Order already captured. If 'intent=CAPTURE' only one "
                                "capture per order is allowed.")
        if o["status"] == "VOIDED":
            raise unprocessable("ORDER_COMPLETED_OR_VOIDED", "Order is voided or completed and hence cannot be "
                                "processed.")
        if o["status"] != "APPROVED":
            raise unprocessable("ORDER_NOT_APPROVED", "Payer has not yet approved the Order for payment. Please "
                                "redirect the payer to the 'rel':'approve' url returned as part of the HATEOAS "
                                "links within the Create Order call or provide a valid payment_source in the "
                                "request.")
        status, reason = self.outcomes.get(oid, ("COMPLETED", None))
        if status == "DECLINED" and reason and reason != "INSTRUMENT_DECLINED":
            raise unprocessable(reason, f"The capture was refused ({reason}).")
        if status == "DECLINED":
            raise unprocessable("INSTRUMENT_DECLINED", "The instrument presented was either declined by the "
                                "processor or bank, or it can't be used for this payment.", links=[
                                    {"href": f"https://www.sandbox.paypal.com/checkoutnow?token={oid}",
                                     "rel": "redirect", "method": "GET"}])
        pu, now = o["purchase_units"][0], now_rfc3339()
        cap_id = rand_id(17, UPPER_ALNUM)
        cap_url = f"{self.base_url}/v2/payments/captures/{cap_id}"
        cap = {"id": cap_id, "status": status, "amount": dict(pu["amount"]), "final_capture": True,
               "seller_protection": {"status": "ELIGIBLE",
                                     "dispute_categories": ["ITEM_NOT_RECEIVED", "UNAUTHORIZED_TRANSACTION"]},
               "links": [{"href": cap_url, "rel": "self", "method": "GET"},
                         {"href": cap_url + "/refund", "rel": "refund", "method": "POST"},
                         {"href": f"{self.base_url}/v2/checkout/orders/{oid}", "rel": "up", "method": "GET"}],
               "create_time": now, "update_time": now,
               "supplementary_data": {"related_ids": {"order_id": oid}}}
        if status == "PENDING":
            cap["status_details"] = {"reason": reason or "PENDING_REVIEW"}
        for name in ("custom_id", "invoice_id"):
            if name in pu:
                cap[name] = pu[name]
        self.objects[cap_id], self.kinds[cap_id] = cap, "capture"
        self.order_capture[oid], self.capture_parent[cap_id] = cap_id, oid
        o["status"], o["update_time"] = "COMPLETED", now
        return 201, ("capture", oid)

    def _capture(self, cap_id):
        if self.kinds.get(cap_id) != "capture":
            raise not_found("capture_id", cap_id, api="payments")
        return self.objects[cap_id]

    def get_capture(self, req, cap_id):
        return copy.deepcopy(self._capture(cap_id))

    def get_refund(self, req, ref_id):
        if self.kinds.get(ref_id) != "refund":
            raise not_found("refund_id", ref_id, api="payments")
        return copy.deepcopy(self.objects[ref_id])

    def refund_capture(self, req, cap_id):
        body = self._json_body(req, required=False)
        cap = self._capture(cap_id)
        if cap["status"] == "REFUNDED":
            raise unprocessable("CAPTURE_FULLY_REFUNDED", "The capture has already been fully refunded.",
                                api="payments")
        if cap["status"] == "PENDING":
            raise unprocessable("PENDING_CAPTURE", "Cannot initiate a refund as the capture is pending.",
                                api="payments")
        if cap["status"] not in ("COMPLETED", "PARTIALLY_REFUNDED"):
            raise unprocessable("TRANSACTION_REFUSED", f"A capture with status {cap['status']} cannot be refunded.",
                                api="payments")
        cc = cap["amount"]["currency_code"]
        total = to_minor(cap["amount"]["value"], cc)
        done = sum(to_minor(self.objects[r]["amount"]["value"], cc) for r in self.capture_refunds.get(cap_id, []))
        remaining = total - done
        amount = remaining
        if "amount" in body:
            rcc, amount = self._amount(body["amount"], "/amount")
            if rcc != cc:
                raise unprocessable("CURRENCY_MISMATCH", "Refund must be in the same currency as the capture.",
                                    "/amount/currency_code", rcc, api="payments")
            if amount > remaining:
                raise unprocessable("REFUND_AMOUNT_EXCEEDED", "The refund amount must be less than or equal to the "
                                    "capture amount that has not yet been refunded.", api="payments")
        now, ref_id = now_rfc3339(), rand_id(17, UPPER_ALNUM)
        refund = {"id": ref_id, "amount": {"currency_code": cc, "value": fmt_amount(amount, cc)},
                  "seller_payable_breakdown": {
                      "gross_amount": {"currency_code": cc, "value": fmt_amount(amount, cc)},
                      "total_refunded_amount": {"currency_code": cc, "value": fmt_amount(done + amount, cc)}},
                  "status": "COMPLETED", "create_time": now, "update_time": now,
                  "links": [{"href": f"{self.base_url}/v2/payments/refunds/{ref_id}", "rel": "self", "method": "GET"},
                            {"href": f"{self.base_url}/v2/payments/captures/{cap_id}", "rel": "up", "method": "GET"}]}
        for name in ("custom_id", "invoice_id"):
            if name in cap:
                refund[name] = cap[name]
        if isinstance(body.get("note_to_payer"), str):
            refund["note_to_payer"] = body["note_to_payer"]
        self.objects[ref_id], self.kinds[ref_id] = refund, "refund"
        self.capture_refunds.setdefault(cap_id, []).append(ref_id)
        cap["status"] = "REFUNDED" if amount == remaining else "PARTIALLY_REFUNDED"
        cap["update_time"] = now
        return 201, ("refund", ref_id)

    def verify_webhook(self, req, *_):
        body = self._json_body(req)
        names = ("auth_algo", "cert_url", "transmission_id", "transmission_sig", "transmission_time",
                 "webhook_id", "webhook_event")
        for name in names:
            if body.get(name) in (None, ""):
                raise pp_err(400, "VALIDATION_ERROR", "Invalid request - see details", "MISSING_REQUIRED_PARAMETER",
                             f"{name} is required.", f"/{name}", api="notifications")
        if not isinstance(body["webhook_event"], dict):
            raise pp_err(400, "VALIDATION_ERROR", "Invalid request - see details", "INVALID_PARAMETER_VALUE",
                         "webhook_event must be the event object.", "/webhook_event", api="notifications")
        cert = urlsplit(str(body["cert_url"]))
        expected = sign_webhook(body["transmission_id"], body["transmission_time"], body["webhook_id"],
                                body["webhook_event"])
        ok = (body["auth_algo"] == "SHA256withRSA" and cert.scheme == "https"
              and (cert.hostname or "").endswith("paypal.com") and body["webhook_id"] == self.webhook_id
              and hmac.compare_digest(str(body["transmission_sig"]), expected))
        return {"verification_status": "SUCCESS" if ok else "FAILURE"}

    # ---- control API (called with self.lock held) ------------------------------
    def control(self, req, data):
        p = req.path
        if p == "/_fake/stats" and req.method == "GET":
            now = time.time()
            return {"token_grants": self.token_grants,
                    "active_tokens": sum(1 for exp in self.tokens.values() if exp > now)}
        if req.method != "POST":
            return None
        oid = str(data.get("id", ""))
        if p in ("/_fake/pay", "/_fake/void", "/_fake/capture_outcome"):
            if self.kinds.get(oid) != "order":
                raise FakeError(404, {"error": f"no such order {oid}"})
            o = self.objects[oid]
            if p == "/_fake/capture_outcome":
                status = data.get("status")
                if status not in ("COMPLETED", "DECLINED", "PENDING"):
                    raise FakeError(400, {"error": "status must be COMPLETED, DECLINED or PENDING"})
                self.outcomes[oid] = (status, data.get("reason"))
                return {"ok": True}
            if o["status"] in ("COMPLETED", "VOIDED"):
                raise FakeError(400, {"error": f"order is {o['status']}"})
            if p == "/_fake/void":
                o["status"] = "VOIDED"
            else:
                self._approve(o)
            return self.order_view(o)
        if p == "/_fake/event":
            return self._event(data)
        return None

    def _approve(self, o):
        o["status"] = "APPROVED"
        name = {"given_name": "John", "surname": "Doe"}
        o["payer"] = {"name": name, "email_address": "sb-buyer@personal.example.com",
                      "payer_id": "FAKEPAYER0001", "address": {"country_code": "US"}}
        o["payment_source"] = {"paypal": {"email_address": "sb-buyer@personal.example.com",
                                          "account_id": "FAKEPAYER0001", "account_status": "VERIFIED",
                                          "name": name}}

    def _event(self, data):
        typ, oid = str(data.get("type", "")), str(data.get("id", ""))
        kind = self.kinds.get(oid)
        if kind is None:
            raise FakeError(404, {"error": f"no such object {oid}"})
        if typ == "CHECKOUT.ORDER.APPROVED":
            if kind != "order":
                raise FakeError(400, {"error": "CHECKOUT.ORDER.APPROVED needs an order id"})
            o = self.objects[oid]
            if o["status"] in ("CREATED", "PAYER_ACTION_REQUIRED"):
                self._approve(o)
            resource, rtype = self.order_view(o), "checkout-order"
            summary = "An order has been approved by buyer"
        elif typ.startswith("PAYMENT.CAPTURE."):
            cap_id = self.order_capture.get(oid) if kind == "order" else oid
            if kind == "refund":
                cap_id = next(c for c, refs in self.capture_refunds.items() if oid in refs)
            if not cap_id:
                raise FakeError(400, {"error": f"order {oid} has no capture"})
            cap = self.objects[cap_id]
            amount = f"{cap['amount']['value']} {cap['amount']['currency_code']}"
            sub = typ.rsplit(".", 1)[1]
            if sub == "REFUNDED":
                refs = self.capture_refunds.get(cap_id)
                if not refs:
                    raise FakeError(400, {"error": f"capture {cap_id} has no refund"})
                resource = copy.deepcopy(self.objects[oid if kind == "refund" else refs[-1]])
                rtype, summary = "refund", f"A {amount} capture payment was refunded"
            elif sub in ("COMPLETED", "DENIED", "PENDING"):
                if cap["status"] in ("COMPLETED", "PENDING", "DECLINED"):
                    cap["status"] = {"COMPLETED": "COMPLETED", "DENIED": "DECLINED", "PENDING": "PENDING"}[sub]
                    cap.pop("status_details", None)
                    if sub == "PENDING":
                        cap["status_details"] = {"reason": data.get("reason") or "PENDING_REVIEW"}
                    cap["update_time"] = now_rfc3339()
                resource, rtype = copy.deepcopy(cap), "capture"
                summary = {"COMPLETED": f"Payment completed for {amount}", "DENIED": f"Payment denied for {amount}",
                           "PENDING": f"Payment pending for {amount}"}[sub]
            else:
                raise FakeError(400, {"error": f"unsupported event type {typ}"})
        else:
            raise FakeError(400, {"error": f"unsupported event type {typ}"})
        ev_id = data.get("event_id") or f"WH-{rand_id(17, UPPER_ALNUM)}-{rand_id(17, UPPER_ALNUM)}"
        event = {"id": ev_id, "event_version": "1.0", "create_time": now_rfc3339(ms=True),
                 "resource_type": rtype, "resource_version": "2.0", "event_type": typ, "summary": summary,
                 "resource": resource,
                 "links": [{"href": f"{self.base_url}/v1/notifications/webhooks-events/{ev_id}", "rel": "self",
                            "method": "GET"},
                           {"href": f"{self.base_url}/v1/notifications/webhooks-events/{ev_id}/resend",
                            "rel": "resend", "method": "POST"}]}
        tid, ttime = str(uuid.uuid4()), now_rfc3339()
        sig = sign_webhook(tid, ttime, self.webhook_id + ("-tampered" if data.get("tamper") else ""), event)
        return {"body": json.dumps(event), "id": ev_id, "webhook_id": self.webhook_id,
                "headers": {"PAYPAL-AUTH-ALGO": "SHA256withRSA", "PAYPAL-CERT-URL": CERT_URL,
                            "PAYPAL-TRANSMISSION-ID": tid, "PAYPAL-TRANSMISSION-SIG": sig,
                            "PAYPAL-TRANSMISSION-TIME": ttime}}


def main(argv=None):
    parser = common_args("Local fake of PayPal (OAuth2, Orders v2, captures/refunds, webhook verification).")
    parser.add_argument("--client-id", default="cid")
    parser.add_argument("--client-secret", default="csecret")
    parser.add_argument("--webhook-id", default="WH-1")
    return run_main(lambda a: FakePayPal(client_id=a.client_id, client_secret=a.client_secret,
                                         webhook_id=a.webhook_id, host=a.host, port=a.port, verbose=a.verbose),
                    parser, argv)


if __name__ == "__main__":
    sys.exit(main())
