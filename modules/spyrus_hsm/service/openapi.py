"""The OpenAPI 3.1 description served at /openapi.json. A test checks that it lists exactly the
routes the application has; field patterns come from validation.py, which enforces them, and what
depends on the configuration (TTL bounds, whether `hub` and `idScope` have defaults) is described
as this service is configured."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..config import ServiceConfig
from . import validation as v
from .routes.signatures import ALGORITHMS

JSON = "application/json"
PROBLEM = "application/problem+json"


# Response headers (RFC 9110 names). X-Request-Id is on every answer under /v1/.
HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": {"description": "The request's id, also the problem's `instance` and in the audit record and "
                                    "log: the caller's own X-Request-Id when it sent one of 1 to 64 visible ASCII "
                                    "characters, else a new one (32 hex digits)",
                     "schema": {"type": "string", "pattern": "^[!-~]{1,64}$"}},
    "Retry-After": {"description": "Seconds to wait before trying again (with 429 always; with 503 when "
                                   "waiting may help: HSM not ready, busy or slow, audit log unavailable)",
                    "schema": {"type": "integer", "minimum": 1}},
    "WWW-Authenticate": {"description": "The scheme to authenticate with: `Bearer realm=\"spyrus-hsm\"` "
                                        "(or a client certificate, over mutual TLS)",
                         "schema": {"type": "string"}},
}
_V1 = {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}}
_RETRY = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
_AUTHENTICATE = {"WWW-Authenticate": {"$ref": "#/components/headers/WWW-Authenticate"}}


def _problem_ref(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = {"description": description, "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    return {**answer, "headers": headers} if headers else answer


def _errors(*codes: int, v1: bool = True) -> dict[str, Any]:
    texts = {
        400: "Invalid request (field named in the detail)", 401: "Not authenticated",
        403: "Not allowed by policy", 404: "Not found", 405: "Method not allowed",
        408: "The request body did not arrive within the request timeout",
        409: "Conflicts with what the HSM holds (a label taken, or naming several objects)",
        413: "Request body too large", 415: "Body is not application/json", 429: "Rate limited (see Retry-After)",
        422: "The HSM refused the operation or the stored credential is unusable",
        500: "Internal error (logged under the request id)", 502: "DPS registration failed",
        503: "HSM not ready, busy or timed out, the audit log unavailable (see Retry-After), "
             "or the module not set up for this",
    }
    extra = {401: _AUTHENTICATE, 429: _RETRY, 503: _RETRY}
    return {str(c): _problem_ref(texts[c], {**(_V1 if v1 else {}), **extra.get(c, {})} or None) for c in codes}


COMMON = (401, 403, 404, 405, 409, 422, 429, 500, 503)
BODY = (400, 408, 413, 415)


def _json_body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _ok(ref: str, description: str) -> dict[str, Any]:
    return {"description": description, "headers": _V1,
            "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def spec(cfg: ServiceConfig, *, default_hub: bool, default_id_scope: bool) -> dict[str, Any]:
    s = {"type": "string"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "spyrus-hsm", "version": __version__,
                 "description": "HSM-backed SAS tokens, signatures, certificates and DPS registration "
                                "for leaf devices. Errors are RFC 9457 problem details."},
        "security": [{"mutualTLS": []}, {"bearer": []}],
        "paths": {
            "/v1/sas-tokens": {"post": {
                "operationId": "createSasToken", "requestBody": _json_body("SasTokenRequest"),
                "responses": {"200": _ok("SasToken", "The token"), **_errors(*BODY, *COMMON)}}},
            "/v1/signatures": {"post": {
                "operationId": "createSignature", "requestBody": _json_body("SignatureRequest"),
                "responses": {"200": _ok("Signature", "The signature"), **_errors(*BODY, *COMMON)}}},
            "/v1/registrations": {"post": {
                "operationId": "createRegistration", "requestBody": _json_body("RegistrationRequest"),
                "responses": {"200": _ok("Registration", "The assignment"),
                              **_errors(*BODY, 502, *COMMON)}}},
            "/v1/registrations/{id}": {"get": {
                "operationId": "getRegistration",
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": v.REGISTRATION_ID}}],
                "responses": {"200": _ok("Registration", "The stored assignment"), **_errors(400, *COMMON)}}},
            "/v1/certificates/{label}": {"get": {
                "operationId": "getCertificateChain",
                "parameters": [{"name": "label", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": v.LABEL}}],
                "responses": {"200": {"description": "PEM certificate chain, leaf first", "headers": _V1,
                                      "content": {"application/pem-certificate-chain": {"schema": s}}},
                              **_errors(400, *COMMON)}}},
            "/healthz": {"get": {"operationId": "healthz", "security": [],
                                 "responses": {"200": {"description": "The process is alive",
                                                       "content": {JSON: {"schema": {"type": "object"}}}},
                                               **_errors(405, 500, v1=False)}}},
            "/readyz": {"get": {"operationId": "readyz", "security": [],
                                "responses": {"200": {"description": "The HSM is present and logged in",
                                                      "content": {JSON: {"schema": {"type": "object"}}}},
                                              **_errors(405, 500, 503, v1=False)}}},
            "/openapi.json": {"get": {"operationId": "openapi", "security": [],
                                      "responses": {"200": {"description": "This document",
                                                            "content": {JSON: {"schema": {"type": "object"}}}},
                                                    **_errors(405, 500, v1=False)}}},
        },
        "components": {
            "securitySchemes": {"mutualTLS": {"type": "mutualTLS"},
                                "bearer": {"type": "http", "scheme": "bearer"}},
            "headers": HEADERS,
            "schemas": _schemas(cfg, default_hub, default_id_scope),
        },
    }


def _schemas(cfg: ServiceConfig, default_hub: bool, default_id_scope: bool) -> dict[str, Any]:
    ttl = {"type": "integer", "minimum": cfg.min_ttl, "maximum": cfg.max_ttl,
           "description": "Token lifetime in seconds (service.min_ttl to service.max_ttl)"}
    min_life = {"type": "integer", "minimum": 1, "maximum": cfg.max_ttl,
                "description": "The least life in seconds the token handed out has left (default: "
                               "service.cache_min_remaining_fraction of ttlSeconds; above ttlSeconds: "
                               "a new token)"}
    device_required = ["deviceId"] if default_hub else ["deviceId", "hub"]
    registration_required = ["registrationId", "attestation", *([] if default_id_scope else ["idScope"])]
    return {
        "SasTokenRequest": {"oneOf": [
            {"type": "object", "additionalProperties": False,
             "required": device_required, "properties": {
                "deviceId": {"type": "string", "pattern": v.DEVICE_ID,
                             "description": "The IoT Hub device the token is for (signed with its key, "
                                            "service.sas_key)"},
                "moduleId": {"type": "string", "pattern": v.DEVICE_ID,
                             "description": "A module of that device: the token is for the module's identity"},
                "hub": {"type": "string", "pattern": v.HOST_NAME,
                        "description": "The IoT Hub host name; " + (
                            "optional here: this service has a default hub (service.hub, else its own)"
                            if default_hub else "required here: this service has no default hub "
                            "(service.hub, or the module's own hub, would make it optional)")},
                "ttlSeconds": ttl, "minRemainingSeconds": min_life}},
            {"type": "object", "additionalProperties": False, "required": ["idScope", "registrationId"],
             "properties": {"idScope": {"type": "string", "pattern": v.ID_SCOPE,
                                        "description": "The DPS ID scope: a token to register with DPS"},
                            "registrationId": {"type": "string", "pattern": v.REGISTRATION_ID,
                                               "description": "The DPS registration id (signed with "
                                                              "service.dps_key)"},
                            "ttlSeconds": ttl, "minRemainingSeconds": min_life}},
        ]},
        "SasToken": {"type": "object", "required": ["token", "resourceUri", "expiresOn", "expiresInSeconds"],
                     "properties": {
            "token": {"type": "string", "description": "The SharedAccessSignature, for the Authorization of "
                                                       "MQTT/AMQP/HTTPS to the hub or DPS"},
            "resourceUri": {"type": "string", "description": "What the token grants: <hub>/devices/<deviceId> "
                            "(/modules/<moduleId>) or <idScope>/registrations/<registrationId>"},
            "expiresOn": {"type": "integer", "description": "Unix time"},
            "expiresInSeconds": {"type": "integer", "description": "seconds of life left when answered, by the "
                                 "service's clock: schedule renewal from this, not from the local clock"}}},
        "SignatureRequest": {"type": "object", "additionalProperties": False,
                             "required": ["key", "algorithm", "data"], "properties": {
            "key": {"type": "string", "pattern": v.LABEL,
                    "description": "An HSM key declared for callers (service.signing_keys); any other key, "
                                   "one reserved for the module's own use included, is 404 as if it did not exist"},
            "algorithm": {"type": "string", "enum": list(ALGORITHMS),
                          "description": "ES256/ES384: ECDSA with SHA-256/SHA-384 (a P-256/P-384 key); RS256: "
                                         "RSASSA-PKCS1-v1_5 with SHA-256; PS256: RSASSA-PSS with SHA-256; "
                                         "HMAC-SHA256: a MAC with a secret key"},
            "data": {"type": "string", "contentEncoding": "base64", "pattern": v.BASE64_DATA,
                     "maxLength": (v.MAX_DATA_BYTES + 2) // 3 * 4,
                     "description": f"The message to sign (at most {v.MAX_DATA_BYTES} bytes), padded base64: the "
                                    "message itself, not its digest; the algorithm hashes it (ES256 with SHA-256)"}}},
        "Signature": {"type": "object", "required": ["signature"], "properties": {
            "signature": {"type": "string", "contentEncoding": "base64",
                          "description": "ES256/ES384: raw r||s; RS256/PS256: PKCS#1; HMAC-SHA256: the MAC"}}},
        "RegistrationRequest": {"type": "object", "additionalProperties": False,
                                "required": registration_required, "properties": {
            "registrationId": {"type": "string", "pattern": v.REGISTRATION_ID,
                               "description": "The leaf's DPS registration id"},
            "idScope": {"type": "string", "pattern": v.ID_SCOPE,
                        "description": "The DPS ID scope; " + (
                            "optional here: this service defaults to its own (cloud.id_scope)" if default_id_scope
                            else "required here: this service has no default (cloud.id_scope would make it "
                                 "optional)")},
            "attestation": {"type": "string", "enum": ["x509", "symmetricKey"],
                            "description": "x509: with the X.509 credential service.x509_label names; "
                                           "symmetricKey: with service.dps_key (or a key derived from "
                                           "service.group_key)"},
            "payload": {"description": "Custom allocation payload (JSON), passed to DPS"},
            "csr": {"type": "string", "contentEncoding": "base64", "pattern": v.BASE64_CSR,
                    "maxLength": (v.MAX_CSR_BYTES + 2) // 3 * 4,
                    "description": "The leaf's DER PKCS#10 request, padded base64, CN = registrationId: "
                                   "DPS issues an operational certificate (policy operation "
                                   "'certificate-issue')"},
            "issueCertificate": {"type": "boolean", "default": False,
                                 "description": "Instead of 'csr': DPS issues a certificate for a P-384 key "
                                                "generated in this HSM (service.leaf_cert_label), stored there"}}},
        "Registration": {"type": "object", "required": ["registrationId", "assignedHub", "deviceId", "status"],
                         "properties": {
            "registrationId": {"type": "string", "description": "As requested"},
            "assignedHub": {"type": "string", "description": "The IoT Hub DPS assigned the device to"},
            "deviceId": {"type": "string", "description": "The device id on that hub"},
            "status": {"type": "string", "description": "DPS's registration status (assigned)"},
            "substatus": {"type": ["string", "null"],
                          "description": "DPS's substatus (initialAssignment, deviceDataMigrated, ...)"},
            "attestation": {"type": "string", "description": "x509 or symmetricKey, as requested"},
            "registeredAt": {"type": "string", "description": "When the registration completed (ISO 8601)"},
            "issuedCertificateChain": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"},
                                       "description": "Issued for 'csr': DER certificates, leaf first"},
            "certificate": {"type": "object", "description": "The issued leaf: subject, issuer, notAfter"}}},
        "Problem": {"type": "object", "required": ["type", "title", "status"], "properties": {
            "type": {"type": "string", "description": "https://spyrus-hsm.dev/problems/<name>: an identifier; "
                                                     "the names are listed in the problem types reference"},
            "title": {"type": "string", "description": "The type's short summary"},
            "status": {"type": "integer", "description": "The HTTP status, repeated"},
            "detail": {"type": "string", "description": "What was wrong with this request (never quoting it)"},
            "instance": {"type": "string", "description": "The request id (X-Request-Id)"}}},
    }
