#!/usr/bin/python3
"""fake_stripe.py - a local fake of the slice of the Stripe API that orderd uses.

Run:    /usr/bin/python3 tests/fakes/fake_stripe.py --port 0 [--key sk_test_fake]
        (first stdout line: "LISTENING <port>"; SIGTERM/SIGINT exits cleanly)
Import: FakeStripe(key=...).start() -> port ... .stop();  sign(secret, body, t)

Faithful to Stripe (docs.stripe.com, 2024 API versions):
  * Bearer (or Basic, key as user) auth; 401 with the invalid_request_error envelope.
  * application/x-www-form-urlencoded requests with nested keys (metadata[k],
    automatic_payment_methods[enabled], expand[]), JSON responses (pretty-printed like
    Stripe's), headers Request-Id and Stripe-Version; unknown parameters are rejected
    ("Received unknown parameter: x", code parameter_unknown) like the real API.
  * Error envelope {"error": {type, code, decline_code, message, param, payment_intent,
    charge, doc_url}}; card declines are HTTP 402 and leave the PaymentIntent in
    requires_payment_method with last_payment_error and a failed charge (latest_charge).
  * Idempotency-Key on POST: the first response (status + body, errors included) is
    stored and replayed with "Idempotent-Replayed: true"; other parameters or another
    endpoint with the same key -> 400 idempotency_error; a key held by an in-flight
    request -> 409 idempotency_error. As Stripe documents, nothing is stored when the
    request failed before the endpoint executed (auth, parameter validation, unknown
    id, idempotency conflicts), so such a request can be retried with the same key.
  * Stripe's test payment methods (pm_card_visa, pm_card_chargeDeclined,
    ...InsufficientFunds, ...Fraudulent, ...LostCard, ...StolenCard, ...ExpiredCard,
    ...IncorrectCvc, ...ProcessingError, pm_card_authenticationRequired).
  * Customers and saved cards: POST /v1/customers (email, name, description,
    metadata), GET /v1/customers/{id}; POST /v1/payment_methods/{id}/attach
    (customer required), GET /v1/payment_methods/{id}. As with Stripe's test ids,
    attaching a test id (pm_card_visa, any pm_card_*) - or retrieving one - mints a new
    PaymentMethod pm_<24> with its card (brand, last4 of the test card) that behaves
    like the test id (same decline / processing / authentication outcome); attaching
    one already attached to another customer -> 400 "The payment method you provided
    has already been attached to a customer." (stored under an Idempotency-Key, like
    the other state errors).
  * A PaymentMethod attached to a Customer is refused on PaymentIntent create (and on
    confirm, against the intent's customer) unless that customer is named: another
    customer -> 400 resource_missing, param payment_method, "The customer does not have
    a payment method with the ID pm_x. The payment method must be attached to the
    customer." (Stripe's words); none -> 400 invalid_request_error, no code, param
    customer (Stripe's shape; the wording "The provided PaymentMethod belongs to a
    Customer: pass the ID of that Customer in the customer parameter." is the
    fake's). A customer that does not exist -> 400 resource_missing, param customer,
    "No such customer: 'cus_x'" (on attach as well; a customer in the URL that does not
    exist is 404). These are validation errors: no PaymentIntent, nothing stored.
    The intent's customer field is the customer named. Test ids used directly are not
    attached to anyone, so they work with or without a (known) customer.
  * Cancel allowed only from requires_payment_method / requires_capture /
    requires_confirmation / requires_action / processing, else 400
    payment_intent_unexpected_state (also when already canceled).
  * Refunds: "This PaymentIntent (pi_..) does not have a successful charge to refund."
    (400, no code); fully refunded -> 400 charge_already_refunded; a partial refund
    larger than what remains -> 400 param amount "Refund amount (...) is greater than
    unrefunded amount on charge (...)" (no code, as Stripe answers).
  * Webhook events signed like Stripe: Stripe-Signature "t=<t>,v1=<hex HMAC-SHA256 of
    '<t>.<body>' keyed with the whole whsec_ string>"; bodies pretty-printed JSON.
  * Minimum amounts for a few currencies (usd/eur 50, gbp 30, ...): amount_too_small.

Simplified / fake-only:
  * One account, one secret key; test mode only (livemode false). No lists, search,
    updates or deletes; no detach, no SetupIntents, no setup_future_usage attaching,
    no customer default payment method; customers carry only id, email, name,
    description, metadata, created. payment_method on a PaymentIntent or charge stays
    an id (last_payment_error and a card error carry the PaymentMethod object when it
    is a stored one, else a stub {id, object, type}).
  * Re-attaching a PaymentMethod to the customer it is already attached to answers it
    unchanged. Minted PaymentMethods' exp_month/exp_year are next year's this month.
  * On a PaymentIntent, any pm_ id that is neither a minted one nor in the table
    succeeds like pm_card_visa (the payment_methods endpoints answer 404 for it);
    pm_card_processing (fake-only) leaves the intent in processing. Confirm without off_session on
    pm_card_authenticationRequired -> requires_action (no 3DS flow; use /_fake/pay).
  * automatic_payment_methods does not demand a return_url when confirming.
  * Currencies: any in the table below, accepted in either case and stored lower-case.
  * 429 body is {"type": "invalid_request_error", "code": "rate_limit"} - Stripe's real
    shape; "rate_limit_error" is only the SDKs' exception name. Clients should key on
    the HTTP status.
  * Idempotency keys never expire; the parameter comparison is on the parsed form.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakebase import FakeError, FakeServer, common_args, rand_id, run_main  # noqa: E402

DEFAULT_API_VERSION = "2024-06-20"
DEFAULT_WEBHOOK_SECRET = "whsec_fake"

CURRENCIES = set("""usd eur gbp jpy chf cad aud nzd sek nok dkk pln czk huf ron bgn hrk isk
try ils aed sar inr sgd hkd twd krw cny thb myr php idr vnd mxn brl clp cop pen ars uyu
zar ngn kes egp mad bif djf gnf kmf mga pyg rwf ugx vuv xaf xof xpf""".split())
ZERO_DECIMAL = set("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
MIN_AMOUNT = {"usd": 50, "eur": 50, "gbp": 30, "chf": 50, "cad": 50, "aud": 50, "nzd": 50,
              "jpy": 50, "sek": 300, "nok": 300, "dkk": 250, "pln": 200}
SYMBOL = {"usd": "$", "eur": "€", "gbp": "£", "jpy": "¥"}

# payment method -> (code, decline_code, message)
DECLINES = {
    "pm_card_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": ("card_declined", "insufficient_funds",
                                                "Your card has insufficient funds."),
    "pm_card_chargeDeclinedFraudulent": ("card_declined", "fraudulent", "Your card was declined."),
    "pm_card_chargeDeclinedLostCard": ("card_declined", "lost_card", "Your card was declined."),
    "pm_card_chargeDeclinedStolenCard": ("card_declined", "stolen_card", "Your card was declined."),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", "expired_card", "Your card has expired."),
    "pm_card_chargeDeclinedIncorrectCvc": ("incorrect_cvc", "incorrect_cvc",
                                           "Your card's security code is incorrect."),
    "pm_card_chargeDeclinedProcessingError": ("processing_error", "processing_error",
                                              "An error occurred while processing your card. "
                                              "Try again in a little bit."),
}
AUTH_REQUIRED = ("authentication_required", "authentication_required",
                 "Your card was declined. This transaction requires authentication.")
DECLINE_MESSAGES = {dc: msg for _, dc, msg in list(DECLINES.values()) + [AUTH_REQUIRED]}

# Stripe's test payment methods -> (brand, last4, funding) of the test card behind each one.
# Any other pm_card_* is a test id too (a visa 4242 here); pm_card_processing is fake-only.
TEST_CARDS = {
    "pm_card_visa": ("visa", "4242", "credit"),
    "pm_card_visa_debit": ("visa", "5556", "debit"),
    "pm_card_mastercard": ("mastercard", "4444", "credit"),
    "pm_card_amex": ("amex", "8431", "credit"),
    "pm_card_chargeDeclined": ("visa", "0002", "credit"),
    "pm_card_chargeDeclinedInsufficientFunds": ("visa", "9995", "credit"),
    "pm_card_chargeDeclinedFraudulent": ("visa", "0019", "credit"),
    "pm_card_chargeDeclinedLostCard": ("visa", "9987", "credit"),
    "pm_card_chargeDeclinedStolenCard": ("visa", "9979", "credit"),
    "pm_card_chargeDeclinedExpiredCard": ("visa", "0069", "credit"),
    "pm_card_chargeDeclinedIncorrectCvc": ("visa", "0127", "credit"),
    "pm_card_chargeDeclinedProcessingError": ("visa", "0119", "credit"),
    "pm_card_authenticationRequired": ("visa", "3184", "credit"),
    "pm_card_processing": ("visa", "4242", "credit"),
}

CANCELABLE = ("requires_payment_method", "requires_capture", "requires_confirmation",
              "requires_action", "processing")
CANCEL_REASONS = ("abandoned", "duplicate", "fraudulent", "requested_by_customer")
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")

PI_CREATE_PARAMS = {"amount", "currency", "metadata", "automatic_payment_methods", "description",
                    "payment_method", "confirm", "off_session", "capture_method", "customer",
                    "receipt_email", "statement_descriptor", "statement_descriptor_suffix",
                    "payment_method_types", "return_url", "setup_future_usage", "expand",
                    "confirmation_method", "error_on_requires_action", "payment_method_options",
                    "shipping", "use_stripe_sdk", "mandate_data"}
PI_CONFIRM_PARAMS = {"payment_method", "off_session", "return_url", "expand", "receipt_email",
                     "setup_future_usage", "payment_method_options", "error_on_requires_action",
                     "use_stripe_sdk", "mandate_data", "shipping"}
CUSTOMER_CREATE_PARAMS = {"email", "name", "description", "metadata", "expand"}
PM_ATTACH_PARAMS = {"customer", "expand"}
REFUND_PARAMS = {"payment_intent", "charge", "amount", "reason", "metadata", "expand",
                 "instructions_email", "refund_application_fee", "reverse_transfer"}


def sign(secret, body_bytes, t):
    """The Stripe-Signature header value for body_bytes at unix time t:
    't=<t>,v1=<lower-case hex HMAC-SHA256(key=secret, msg=b"<t>." + body)>'."""
    if isinstance(body_bytes, str):
        body_bytes = body_bytes.encode()
    t = int(t)
    mac = hmac.new(secret.encode(), str(t).encode() + b"." + body_bytes, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def err(status, type_, message, code=None, param=None, store=False, headers=None, **extra):
    e = {"type": type_}
    if code:
        e["code"] = code
        e["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
    e["message"] = message
    if param:
        e["param"] = param
    e.update(extra)
    return FakeError(status, {"error": e}, headers=headers, store=store)


def invalid(message, param=None, code=None, status=400, store=False, **extra):
    return err(status, "invalid_request_error", message, code=code, param=param, store=store, **extra)


def is_test_pm(pm):
    """A magic test id (pm_card_visa, ...): every use stands for a fresh PaymentMethod."""
    return isinstance(pm, str) and (pm in TEST_CARDS or pm.startswith("pm_card_"))


def money(amount, currency):
    major = amount if currency in ZERO_DECIMAL else amount / 100
    text = f"{major:,.0f}" if currency in ZERO_DECIMAL else f"{major:,.2f}"
    sym = SYMBOL.get(currency)
    return f"{sym}{text}" if sym else f"{text} {currency.upper()}"


class FakeStripe(FakeServer):
    name = "fake-stripe"

    def __init__(self, key="sk_test_fake", api_version=DEFAULT_API_VERSION, **kw):
        self._initial = {"key": key, "api_version": api_version}
        super().__init__(**kw)

    def reset_state(self):
        self.key = self._initial["key"]
        self.api_version = self._initial["api_version"]
        self.idem = {}  # key -> {"fp", "path", "done", "status", "body", "req_id"}
        # Customers (cus_) and PaymentMethods (pm_) live in self.objects, which reset() has
        # just emptied; this maps each minted pm_ id to the test id it behaves like.
        self.pm_origin = {}

    def configure(self, data):
        for k, v in data.items():
            if k not in ("key", "api_version"):
                raise FakeError(400, {"error": f"unknown config key {k}"})
            setattr(self, k, v)

    def config_view(self):
        return {"key": self.key, "api_version": self.api_version}

    def encode(self, obj):
        return json.dumps(obj, indent=2).encode()

    def injected_error(self, mode):
        if mode == "429":
            return 429, {"error": {"type": "invalid_request_error", "code": "rate_limit",
                                   "message": "Request rate limit exceeded. Learn more about rate "
                                              "limits here https://stripe.com/docs/rate-limits."}}, {}
        if mode == "409":
            return 409, {"error": {"type": "invalid_request_error", "code": "lock_timeout",
                                   "message": "This object cannot be accessed right now because another "
                                              "API request or Stripe process is currently accessing it. "
                                              "If you see this error intermittently, retry the request."}}, {}
        return 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}, \
            {"Stripe-Should-Retry": "true"}

    # ---- request pipeline --------------------------------------------------
    def handle(self, req):
        headers = {"Request-Id": "req_" + rand_id(14),
                   "Stripe-Version": req.header("stripe-version") or self.api_version}
        try:
            self._auth(req)
            key = req.header("idempotency-key") if req.method == "POST" else None
            if key is None:
                self.pause(req)
                status, body = self._route(req)
            else:
                status, body, extra = self._idempotent(req, key, headers["Request-Id"])
                headers.update(extra)
        except FakeError as e:
            status, body = e.status, e.body
            headers.update(e.headers)
        return status, body, headers

    def _auth(self, req):
        h = req.header("authorization", "")
        if not h:
            raise invalid("You did not provide an API key. You need to provide your API key in the "
                          "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                          "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for "
                          "details, or we can help at https://support.stripe.com/.", status=401)
        scheme, _, cred = h.partition(" ")
        key = cred.strip()
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(key).decode().split(":", 1)[0]
            except ValueError:
                key = ""
        if key != self.key:
            masked = key[:8] + "*" * max(0, len(key) - 12) + key[-4:] if len(key) > 12 else key
            raise invalid(f"Invalid API Key provided: {masked}", status=401)

    def _idempotent(self, req, key, req_id):
        if len(key) > 255:
            raise invalid("Idempotency-Key must be at most 255 characters long.")
        fp = json.dumps(req.form, sort_keys=True)
        with self.lock:
            ent = self.idem.get(key)
            if ent is None:
                ent = self.idem[key] = {"fp": fp, "path": req.path, "done": False}
            elif not ent["done"]:
                raise err(409, "idempotency_error",
                          "There is currently another in-progress request using this Idempotent Key "
                          "(that probably means you submitted twice, and the other request is still "
                          f"going through): {key}. Please try again later.")
            elif ent["path"] != req.path:
                raise err(400, "idempotency_error",
                          "Keys for idempotent requests can only be used for the same endpoint they were "
                          f"first used for ('{req.path}' vs '{ent['path']}'). Try using a key other than "
                          f"'{key}' if you meant to execute a different request.")
            elif ent["fp"] != fp:
                raise err(400, "idempotency_error",
                          "Keys for idempotent requests can only be used with the same parameters they "
                          f"were first used with. Try using a key other than '{key}' if you meant to "
                          "execute a different request.")
            else:
                return ent["status"], copy.deepcopy(ent["body"]), {
                    "Idempotent-Replayed": "true", "Idempotency-Key": key, "Original-Request": ent["req_id"]}
        try:
            self.pause(req)
            status, body = self._route(req)
            if getattr(req, "fail_after", False):
                # As Stripe documents: a 500 after the endpoint began is stored under the key
                # and replayed to every retry for 24 h, whatever the side effects were.
                status, body = 500, {"error": {"type": "api_error", "message": "An unknown error occurred"}}
        except FakeError as e:
            if not e.store:
                with self.lock:
                    del self.idem[key]
                raise
            status, body = e.status, e.body
        except BaseException:
            with self.lock:
                del self.idem[key]
            raise
        with self.lock:
            ent.update(done=True, status=status, body=copy.deepcopy(body), req_id=req_id)
        return status, body, {"Idempotency-Key": key}

    ROUTES = [
        ("POST", r"/v1/payment_intents", "create_pi"),
        ("GET", r"/v1/payment_intents/([^/]+)", "get_pi"),
        ("POST", r"/v1/payment_intents/([^/]+)/confirm", "confirm_pi"),
        ("POST", r"/v1/payment_intents/([^/]+)/cancel", "cancel_pi"),
        ("POST", r"/v1/payment_intents/([^/]+)/capture", "capture_pi"),
        ("POST", r"/v1/refunds", "create_refund"),
        ("GET", r"/v1/refunds", "list_refunds"),
        ("GET", r"/v1/refunds/([^/]+)", "get_refund"),
        ("GET", r"/v1/charges/([^/]+)", "get_charge"),
        ("POST", r"/v1/customers", "create_customer"),
        ("GET", r"/v1/customers/([^/]+)", "get_customer"),
        ("POST", r"/v1/payment_methods/([^/]+)/attach", "attach_pm"),
        ("GET", r"/v1/payment_methods/([^/]+)", "get_pm"),
    ]

    def _route(self, req):
        for method, pattern, fn in self.ROUTES:
            m = re.fullmatch(pattern, req.path)
            if m and method == req.method:
                params = req.form if req.method == "POST" else req.query
                with self.lock:
                    return 200, getattr(self, fn)(params, *m.groups())
        raise invalid(f"Unrecognized request URL ({req.method}: {req.path}). Please see "
                      "https://stripe.com/docs or we can help at https://support.stripe.com/.", status=404)

    # ---- parameter helpers -------------------------------------------------
    @staticmethod
    def _check_params(p, allowed):
        for k in p:
            if k not in allowed:
                raise invalid(f"Received unknown parameter: {k}", param=k, code="parameter_unknown")

    @staticmethod
    def _bool(p, name):
        v = p.get(name)
        if v is None:
            return False
        if v in ("true", "false"):
            return v == "true"
        raise invalid(f"Invalid boolean: {v}", param=name)

    @staticmethod
    def _int(p, name):
        v = p.get(name)
        if not isinstance(v, str) or not re.fullmatch(r"-?\d+", v):
            raise invalid(f"Invalid integer: {v}", param=name, code="parameter_invalid_integer")
        return int(v)

    @staticmethod
    def _metadata(p):
        md = p.get("metadata", {})
        if md == "":
            return {}
        if isinstance(md, list):
            md = {str(i): v for i, v in enumerate(md)}
        if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
            raise invalid("Invalid hash", param="metadata")
        if len(md) > 50:
            raise invalid("You can only specify up to 50 metadata keys.", param="metadata")
        for k, v in md.items():
            if len(k) > 40:
                raise invalid("Metadata keys can have a maximum length of 40 characters.", param=f"metadata[{k}]")
            if len(v) > 500:
                raise invalid("Metadata values can have a maximum length of 500 characters.", param=f"metadata[{k}]")
        return {k: v for k, v in md.items() if v != ""}

    @staticmethod
    def _str(p, name):
        v = p.get(name)
        if v is not None and not isinstance(v, str):
            raise invalid(f"Invalid string: {v}", param=name)
        return v or None

    def _customer_param(self, p):
        """The customer a request names (None if none), which must exist: else 400
        resource_missing, param customer, as Stripe answers for an id in the body."""
        cus = self._str(p, "customer")
        if cus is not None and (cus not in self.objects or not cus.startswith("cus_")):
            raise invalid(f"No such customer: '{cus}'", param="customer", code="resource_missing")
        return cus

    def _check_pm_customer(self, pm, customer):
        """Stripe refuses a PaymentMethod that is attached to a Customer unless the request
        (or, for confirm, the PaymentIntent) names that same customer. Validation: nothing
        is created and nothing is stored under an Idempotency-Key."""
        obj = self.objects.get(pm) if isinstance(pm, str) else None
        if obj is None or obj.get("object") != "payment_method" or not obj["customer"]:
            return
        if customer is None:
            raise invalid("The provided PaymentMethod belongs to a Customer: pass the ID of that Customer "
                          "in the customer parameter.", param="customer")
        if customer != obj["customer"]:
            raise invalid(f"The customer does not have a payment method with the ID {pm}. The payment "
                          "method must be attached to the customer.", param="payment_method",
                          code="resource_missing")

    @staticmethod
    def _expand(p):
        e = p.get("expand") or []
        return [e] if isinstance(e, str) else list(e)

    def _get(self, oid, prefix, kind, param):
        obj = self.objects.get(oid)
        if obj is None or not oid.startswith(prefix):
            raise invalid(f"No such {kind}: '{oid}'", param=param, code="resource_missing", status=404)
        return obj

    # ---- objects -----------------------------------------------------------
    def render_pi(self, pi, expand=()):
        out = copy.deepcopy(pi)
        if "latest_charge" in expand and pi["latest_charge"]:
            out["latest_charge"] = copy.deepcopy(self.objects[pi["latest_charge"]])
        return out

    def _mint_pm(self, test_pm, customer=None):
        """A new PaymentMethod pm_<random> that behaves like the test id it came from."""
        brand, last4, funding = TEST_CARDS.get(test_pm, TEST_CARDS["pm_card_visa"])
        now = time.localtime()
        pm = {"id": "pm_" + rand_id(24), "object": "payment_method",
              "billing_details": {"address": None, "email": None, "name": None, "phone": None},
              "card": {"brand": brand, "country": "US", "exp_month": now.tm_mon, "exp_year": now.tm_year + 1,
                       "funding": funding, "last4": last4},
              "created": int(time.time()), "customer": customer, "livemode": False, "metadata": {},
              "type": "card"}
        self.objects[pm["id"]] = pm
        self.pm_origin[pm["id"]] = test_pm
        return pm

    def _pm_view(self, pm):
        obj = self.objects.get(pm)
        if obj is not None and obj.get("object") == "payment_method":
            return copy.deepcopy(obj)
        return {"id": pm, "object": "payment_method", "type": "card"}

    def _new_charge(self, pi, failure=None):
        ok = failure is None
        manual = pi["capture_method"] == "manual"
        ch = {"id": "ch_" + rand_id(24), "object": "charge", "amount": pi["amount"],
              "amount_captured": pi["amount"] if ok and not manual else 0, "amount_refunded": 0,
              "balance_transaction": "txn_" + rand_id(24) if ok and not manual else None,
              "captured": ok and not manual, "created": int(time.time()), "currency": pi["currency"],
              "description": pi["description"], "failure_code": None if ok else failure[0],
              "failure_message": None if ok else failure[2], "livemode": False,
              "metadata": dict(pi["metadata"]),
              "outcome": {"network_status": "approved_by_network", "reason": None, "risk_level": "normal",
                          "seller_message": "Payment complete.", "type": "authorized"} if ok else
              {"network_status": "declined_by_network", "reason": failure[1], "risk_level": "normal",
               "seller_message": "The bank did not return any further details with this decline.",
               "type": "issuer_declined"},
              "paid": ok, "payment_intent": pi["id"], "payment_method": pi["payment_method"],
              "receipt_url": "https://pay.stripe.com/receipts/payment/" + rand_id(48),
              "refunded": False, "status": "succeeded" if ok else "failed"}
        self.objects[ch["id"]] = ch
        pi["latest_charge"] = ch["id"]
        return ch

    def _succeed(self, pi):
        self._new_charge(pi)
        pi["last_payment_error"] = None
        pi["next_action"] = None
        if pi["capture_method"] == "manual":
            pi["status"], pi["amount_capturable"] = "requires_capture", pi["amount"]
        else:
            pi["status"], pi["amount_received"] = "succeeded", pi["amount"]

    def _decline(self, pi, code, decline_code, message, raise_error=True):
        pm = pi["payment_method"] or "pm_card_chargeDeclined"
        ch = self._new_charge(pi, (code, decline_code, message))
        pm_obj = self._pm_view(pm)
        pi["last_payment_error"] = {"type": "card_error", "code": code, "decline_code": decline_code,
                                    "message": message, "charge": ch["id"], "payment_method": pm_obj,
                                    "doc_url": f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"}
        pi["status"], pi["payment_method"], pi["next_action"] = "requires_payment_method", None, None
        if raise_error:
            raise err(402, "card_error", message, code=code, decline_code=decline_code, charge=ch["id"],
                      payment_method=pm_obj, payment_intent=self.render_pi(pi), store=True)

    def _confirm(self, pi, pm, off_session):
        pi["payment_method"] = pm
        pm = self.pm_origin.get(pm, pm)  # a minted PaymentMethod behaves like its test id
        if pm == "pm_card_processing":
            pi["status"] = "processing"
        elif pm == "pm_card_authenticationRequired" and not off_session:
            pi["status"] = "requires_action"
            pi["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}}
        elif pm == "pm_card_authenticationRequired":
            self._decline(pi, *AUTH_REQUIRED)
        elif pm in DECLINES:
            self._decline(pi, *DECLINES[pm])
        else:
            self._succeed(pi)

    def _unexpected_state(self, pi, verb, past, allowed):
        return invalid(f"You cannot {verb} this PaymentIntent because it has a status of {pi['status']}. "
                       f"Only a PaymentIntent with one of the following statuses may be {past}: "
                       f"{', '.join(allowed)}.", code="payment_intent_unexpected_state", store=True,
                       payment_intent=self.render_pi(pi))

    # ---- endpoints (called with self.lock held) ----------------------------
    def create_pi(self, p):
        self._check_params(p, PI_CREATE_PARAMS)
        if "amount" not in p:
            raise invalid("Missing required param: amount.", param="amount", code="parameter_missing")
        amount = self._int(p, "amount")
        if amount < 1:
            raise invalid("This value must be greater than or equal to 1.", param="amount",
                          code="parameter_invalid_integer")
        if "currency" not in p:
            raise invalid("Missing required param: currency.", param="currency", code="parameter_missing")
        currency = p["currency"].lower() if isinstance(p["currency"], str) else ""
        if currency not in CURRENCIES:
            raise invalid(f"Invalid currency: {p['currency']}. Stripe currently supports these currencies: "
                          f"{', '.join(sorted(CURRENCIES))}", param="currency")
        if amount > 99999999:
            raise invalid(f"Amount must be no more than {money(99999999, currency)}", param="amount",
                          code="amount_too_large")
        if amount < MIN_AMOUNT.get(currency, 1):
            raise invalid(f"Amount must be at least {money(MIN_AMOUNT[currency], currency)} {currency}",
                          param="amount", code="amount_too_small")
        metadata = self._metadata(p)
        apm = p.get("automatic_payment_methods")
        if apm is not None:
            if not isinstance(apm, dict):
                raise invalid("Invalid hash", param="automatic_payment_methods")
            self._check_params({f"automatic_payment_methods[{k}]": v for k, v in apm.items()},
                               {"automatic_payment_methods[enabled]", "automatic_payment_methods[allow_redirects]"})
            enabled = self._bool(apm, "enabled")
            apm = {"allow_redirects": apm.get("allow_redirects", "always"), "enabled": True} if enabled else None
        capture_method = p.get("capture_method", "automatic")
        if capture_method not in ("automatic", "automatic_async", "manual"):
            raise invalid(f"Invalid capture_method: {capture_method}", param="capture_method")
        confirm, off_session = self._bool(p, "confirm"), self._bool(p, "off_session")
        pm = p.get("payment_method")
        if confirm and not pm:
            raise invalid("You cannot confirm this PaymentIntent because it's missing a payment method. You can "
                          "either update the PaymentIntent with a payment method and then confirm it again, or "
                          "confirm it again directly with a payment method.",
                          code="payment_intent_unexpected_state")
        customer = self._customer_param(p)
        self._check_pm_customer(pm, customer)
        pi_id = "pi_" + rand_id(24)
        pi = {"id": pi_id, "object": "payment_intent", "amount": amount, "amount_capturable": 0,
              "amount_received": 0, "automatic_payment_methods": apm, "canceled_at": None,
              "cancellation_reason": None, "capture_method": capture_method,
              "client_secret": f"{pi_id}_secret_{rand_id(25)}", "confirmation_method": "automatic",
              "created": int(time.time()), "currency": currency, "customer": customer,
              "description": p.get("description"), "last_payment_error": None, "latest_charge": None,
              "livemode": False, "metadata": metadata, "next_action": None, "payment_method": pm,
              "payment_method_types": p.get("payment_method_types") or ["card"],
              "receipt_email": p.get("receipt_email"),
              "status": "requires_confirmation" if pm else "requires_payment_method"}
        self.objects[pi_id] = pi
        if confirm:
            self._confirm(pi, pm, off_session)
        return self.render_pi(pi, self._expand(p))

    def get_pi(self, p, pi_id):
        return self.render_pi(self._get(pi_id, "pi_", "payment_intent", "intent"), self._expand(p))

    def confirm_pi(self, p, pi_id):
        self._check_params(p, PI_CONFIRM_PARAMS)
        pi = self._get(pi_id, "pi_", "payment_intent", "intent")
        allowed = ("requires_payment_method", "requires_confirmation", "requires_action")
        if pi["status"] not in allowed:
            raise self._unexpected_state(pi, "confirm", "confirmed", allowed)
        pm = p.get("payment_method") or pi["payment_method"]
        if not pm:
            raise invalid("You cannot confirm this PaymentIntent because it's missing a payment method.",
                          code="payment_intent_unexpected_state")
        self._check_pm_customer(pm, pi["customer"])
        self._confirm(pi, pm, self._bool(p, "off_session"))
        return self.render_pi(pi, self._expand(p))

    def cancel_pi(self, p, pi_id):
        self._check_params(p, {"cancellation_reason", "expand"})
        pi = self._get(pi_id, "pi_", "payment_intent", "intent")
        reason = p.get("cancellation_reason")
        if reason is not None and reason not in CANCEL_REASONS:
            raise invalid(f"Invalid cancellation_reason: must be one of {', '.join(CANCEL_REASONS)}",
                          param="cancellation_reason")
        if pi["status"] not in CANCELABLE:
            raise self._unexpected_state(pi, "cancel", "canceled", CANCELABLE)
        pi.update(status="canceled", canceled_at=int(time.time()), cancellation_reason=reason,
                  amount_capturable=0, next_action=None)
        return self.render_pi(pi, self._expand(p))

    def capture_pi(self, p, pi_id):
        self._check_params(p, {"amount_to_capture", "expand", "metadata"})
        pi = self._get(pi_id, "pi_", "payment_intent", "intent")
        if pi["status"] != "requires_capture":
            raise invalid(f"This PaymentIntent could not be captured because it has a status of {pi['status']}. "
                          "Only a PaymentIntent with one of the following statuses may be captured: "
                          "requires_capture.", code="payment_intent_unexpected_state", store=True,
                          payment_intent=self.render_pi(pi))
        amount = self._int(p, "amount_to_capture") if "amount_to_capture" in p else pi["amount_capturable"]
        if not 0 < amount <= pi["amount_capturable"]:
            raise invalid("The amount to capture must be positive and no more than the amount capturable.",
                          param="amount_to_capture")
        ch = self.objects[pi["latest_charge"]]
        ch.update(captured=True, amount_captured=amount, balance_transaction="txn_" + rand_id(24))
        pi.update(status="succeeded", amount_received=amount, amount_capturable=0)
        return self.render_pi(pi, self._expand(p))

    def create_refund(self, p):
        self._check_params(p, REFUND_PARAMS)
        pi_id, ch_id = p.get("payment_intent"), p.get("charge")
        if not pi_id and not ch_id:
            raise invalid("One of the following params should be provided for this request: payment_intent or charge.")
        if pi_id:
            pi = self._get(pi_id, "pi_", "payment_intent", "payment_intent")
            ch = self.objects.get(pi["latest_charge"] or "")
            if ch is None or ch["status"] != "succeeded" or not ch["captured"]:
                raise invalid(f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.",
                              param="payment_intent", store=True)
            if ch_id and ch_id != ch["id"]:
                raise invalid(f"Charge {ch_id} does not belong to PaymentIntent {pi_id}.", param="charge")
        else:
            ch = self._get(ch_id, "ch_", "charge", "charge")
            if ch["status"] != "succeeded" or not ch["captured"]:
                raise invalid(f"Charge {ch_id} cannot be refunded because it has not succeeded or been captured.",
                              param="charge", store=True)
        reason = p.get("reason")
        if reason is not None and reason not in REFUND_REASONS:
            raise invalid(f"Invalid reason: must be one of {', '.join(REFUND_REASONS)}", param="reason")
        metadata = self._metadata(p)
        remaining = ch["amount_captured"] - ch["amount_refunded"]
        if remaining <= 0:
            raise invalid(f"Charge {ch['id']} has already been refunded.", code="charge_already_refunded",
                          store=True)
        amount = remaining
        if "amount" in p:
            amount = self._int(p, "amount")
            if amount < 1:
                raise invalid("This value must be greater than or equal to 1.", param="amount",
                              code="parameter_invalid_integer")
            if amount > remaining:
                raise invalid(f"Refund amount ({money(amount, ch['currency'])}) is greater than unrefunded "
                              f"amount on charge ({money(remaining, ch['currency'])})", param="amount", store=True)
        ch["amount_refunded"] += amount
        ch["refunded"] = ch["amount_refunded"] >= ch["amount_captured"]
        re_ = {"id": "re_" + rand_id(24), "object": "refund", "amount": amount,
               "balance_transaction": "txn_" + rand_id(24), "charge": ch["id"], "created": int(time.time()),
               "currency": ch["currency"], "metadata": metadata, "payment_intent": ch["payment_intent"],
               "reason": reason, "receipt_number": None, "source_transfer_reversal": None,
               "status": "succeeded", "transfer_reversal": None}
        self.objects[re_["id"]] = re_
        return copy.deepcopy(re_)

    def list_refunds(self, p):
        """GET /v1/refunds: newest first, filtered by payment_intent / charge, `limit`
        (1..100, default 10); a list object like Stripe's (no pagination cursors)."""
        self._check_params(p, {"payment_intent", "charge", "limit", "created", "ending_before",
                               "starting_after", "expand"})
        limit = 10
        if p.get("limit") is not None:
            limit = self._int(p, "limit")
            if not 1 <= limit <= 100:
                raise invalid("This value must be greater than or equal to 1 and less than or "
                              "equal to 100.", param="limit")
        rows = [o for o in self.objects.values() if o.get("object") == "refund"
                and (not p.get("payment_intent") or o["payment_intent"] == p["payment_intent"])
                and (not p.get("charge") or o["charge"] == p["charge"])]
        rows.reverse()  # objects keep creation order: newest first, as Stripe lists
        return {"object": "list", "data": copy.deepcopy(rows[:limit]),
                "has_more": len(rows) > limit, "url": "/v1/refunds"}

    def get_refund(self, p, re_id):
        return copy.deepcopy(self._get(re_id, "re_", "refund", "id"))

    def get_charge(self, p, ch_id):
        return copy.deepcopy(self._get(ch_id, "ch_", "charge", "id"))

    def create_customer(self, p):
        self._check_params(p, CUSTOMER_CREATE_PARAMS)
        fields = {k: self._str(p, k) for k in ("email", "name", "description")}
        metadata = self._metadata(p)
        cus = {"id": "cus_" + rand_id(14), "object": "customer", "created": int(time.time()),
               "description": fields["description"], "email": fields["email"], "livemode": False,
               "metadata": metadata, "name": fields["name"]}
        self.objects[cus["id"]] = cus
        return copy.deepcopy(cus)

    def get_customer(self, p, cus_id):
        return copy.deepcopy(self._get(cus_id, "cus_", "customer", "id"))

    def _lookup_pm(self, pm_id):
        obj = self.objects.get(pm_id)
        if obj is None or obj.get("object") != "payment_method":
            if is_test_pm(pm_id):
                return None
            raise invalid(f"No such PaymentMethod: '{pm_id}'", param="payment_method", code="resource_missing",
                          status=404)
        return obj

    def attach_pm(self, p, pm_id):
        self._check_params(p, PM_ATTACH_PARAMS)
        if not p.get("customer"):
            raise invalid("Missing required param: customer.", param="customer", code="parameter_missing")
        obj = self._lookup_pm(pm_id)
        customer = self._customer_param(p)
        if obj is None:  # a test id: attaching it mints a new PaymentMethod, as Stripe does
            return copy.deepcopy(self._mint_pm(pm_id, customer))
        if obj["customer"] not in (None, customer):
            raise invalid("The payment method you provided has already been attached to a customer.",
                          store=True)
        obj["customer"] = customer
        return copy.deepcopy(obj)

    def get_pm(self, p, pm_id):
        obj = self._lookup_pm(pm_id)
        return copy.deepcopy(obj if obj is not None else self._mint_pm(pm_id))

    # ---- control API (called with self.lock held) --------------------------
    def _ctl_pi(self, data):
        pi = self.objects.get(str(data.get("id")))
        if pi is None or pi.get("object") != "payment_intent":
            raise FakeError(404, {"error": f"no such payment_intent {data.get('id')}"})
        return pi

    def control(self, req, data):
        if req.method != "POST":
            return None
        if req.path == "/_fake/pay":
            pi = self._ctl_pi(data)
            if pi["status"] in ("succeeded", "canceled", "requires_capture"):
                raise FakeError(400, {"error": f"payment_intent is {pi['status']}"})
            pi["payment_method"] = data.get("payment_method") or pi["payment_method"] or "pm_card_visa"
            self._succeed(pi)
            return self.render_pi(pi)
        if req.path == "/_fake/pay_failed":
            pi = self._ctl_pi(data)
            if pi["status"] in ("succeeded", "canceled", "requires_capture"):
                raise FakeError(400, {"error": f"payment_intent is {pi['status']}"})
            dc = data.get("decline_code") or "generic_decline"
            code = dc if dc in ("expired_card", "incorrect_cvc", "processing_error",
                                "authentication_required") else "card_declined"
            self._decline(pi, code, dc, DECLINE_MESSAGES.get(dc, "Your card was declined."), raise_error=False)
            return self.render_pi(pi)
        if req.path == "/_fake/event":
            return self._event(data)
        return None

    def _event(self, data):
        typ, oid = str(data.get("type", "")), str(data.get("id", ""))
        kind = typ.split(".")[0]
        obj = self.objects.get(oid)
        if obj is None:
            raise FakeError(404, {"error": f"no such object {oid}"})
        if kind == "charge" and obj["object"] == "payment_intent":
            obj = self.objects.get(obj["latest_charge"] or "")
        elif kind == "payment_intent" and obj["object"] == "charge":
            obj = self.objects.get(obj["payment_intent"])
        elif kind == "refund" and obj["object"] in ("payment_intent", "charge"):
            ch_id = obj["id"] if obj["object"] == "charge" else obj["latest_charge"]
            refunds = [o for o in self.objects.values() if o["object"] == "refund" and o["charge"] == ch_id]
            obj = refunds[-1] if refunds else None
        if obj is None or obj["object"] != kind:
            raise FakeError(400, {"error": f"cannot build a {typ} event from {oid}"})
        ts = int(data.get("timestamp") or time.time())
        event = {"id": data.get("event_id") or "evt_" + rand_id(24), "object": "event",
                 "api_version": data.get("api_version") or self.api_version, "created": ts,
                 "data": {"object": copy.deepcopy(obj)}, "livemode": False, "pending_webhooks": 1,
                 "request": {"id": None, "idempotency_key": None}, "type": typ}
        body = json.dumps(event, indent=2)
        secret = data.get("secret") or DEFAULT_WEBHOOK_SECRET
        signature = sign(secret + "-tampered" if data.get("tamper") else secret, body.encode(), ts)
        return {"body": body, "signature": signature, "id": event["id"], "timestamp": ts}


def main(argv=None):
    parser = common_args("Local fake of the Stripe API (PaymentIntents, refunds, customers, "
                         "saved payment methods, webhooks).")
    parser.add_argument("--key", default="sk_test_fake", help="the secret key clients must send")
    parser.add_argument("--api-version", default=DEFAULT_API_VERSION)
    return run_main(lambda a: FakeStripe(key=a.key, api_version=a.api_version, host=a.host, port=a.port,
                                         verbose=a.verbose), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
