"""The admin API described as OpenAPI 3.0, served at /api/openapi.json.

The tests validate real answers of a running server against it (openapi-core), so the document
and the code cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_NUM = {"type": "number", "nullable": True}
_ERR = _json(_ref("Error"), "what went wrong")
_AUTH = {"401": _json(_ref("Error"), "no token, or a wrong one (the same answer for both)")}
_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "the backend's id (machine id, or host:port for an entry without one) "
    "or its name",
    "schema": {"type": "string"},
}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "doproxy admin API",
        "version": "1",
        "description": "The runtime API of doproxy's admin listener (docs/admin-api.md). "
        "GET endpoints need no token on a loopback listener; every POST and PUT, and every "
        "endpoint on a listener bound beyond loopback, needs Authorization: Bearer <token>.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "Latency": {
                "type": "object",
                "required": ["average", "p95"],
                "properties": {"average": _NUM, "p95": _NUM},
            },
            "Backend": {
                "type": "object",
                "required": [
                    "id",
                    "name",
                    "address",
                    "state",
                    "health",
                    "eligible",
                    "weight",
                    "canary_weight",
                    "in_flight",
                    "requests_per_second",
                    "error_rate",
                    "latency",
                    "age",
                    "owner",
                ],
                "properties": {
                    "id": {"type": "string"},
                    "name": {"type": "string"},
                    "address": {"type": "string"},
                    "state": {
                        "type": "string",
                        "enum": ["active", "draining", "disabled", "provisioning"],
                    },
                    "health": {"type": "string", "enum": ["up", "down"]},
                    "ejected": {"type": "boolean"},
                    "eligible": {"type": "boolean"},
                    "weight": {"type": "integer"},
                    "canary_weight": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": 100,
                        "description": "the percent of the traffic a rollout's canary takes; "
                        "0 for a backend that is not a canary",
                    },
                    "in_flight": {"type": "integer"},
                    "requests": {"type": "integer"},
                    "failures": {"type": "integer"},
                    "requests_per_second": _NUM,
                    "error_rate": _NUM,
                    "latency": _ref("Latency"),
                    "age": _NUM,
                    "owner": {
                        "type": "string",
                        "enum": [
                            "this installation",
                            "another installation",
                            "unknown",
                            "hand-written",
                        ],
                    },
                    "provider": {"type": "string", "nullable": True},
                },
            },
            "Status": {
                "type": "object",
                "required": ["version", "config_generation", "listener", "backends"],
                "properties": {
                    "version": {"type": "string"},
                    "pid": {"type": "integer"},
                    "uptime": {"type": "number"},
                    "time": {"type": "number"},
                    "config_generation": {"type": "integer"},
                    "listener": {
                        "type": "object",
                        "required": ["addresses", "https", "in_flight", "latency"],
                        "properties": {
                            "addresses": {"type": "array", "items": {"type": "string"}},
                            "https": {"type": "boolean"},
                            "connections": {"type": "integer"},
                            "in_flight": {"type": "integer"},
                            "requests": {"type": "integer"},
                            "requests_per_second": _NUM,
                            "latency": _ref("Latency"),
                            "balancing": {"type": "string"},
                        },
                    },
                    # Empty when the main process serves itself (workers = 1).
                    "workers": {"type": "array", "items": _ref("Worker")},
                    "backends": {"type": "array", "items": _ref("Backend")},
                    "cost": _ref("Cost"),
                    # null with the file store (the Cluster schema is nullable).
                    "cluster": _ref("Cluster"),
                },
            },
            "Cluster": {
                "type": "object",
                "nullable": True,
                "required": ["store", "node", "etcd_up", "leader", "leading", "nodes"],
                "properties": {
                    "store": {"type": "string", "enum": ["etcd"]},
                    "node": {"type": "string"},
                    "prefix": {"type": "string"},
                    "endpoints": {"type": "array", "items": {"type": "string"}},
                    "etcd_up": {"type": "boolean"},
                    "etcd_error": {"type": "string", "nullable": True},
                    "down_for": _NUM,
                    "leader": {"type": "string", "nullable": True},
                    "leading": {"type": "boolean"},
                    "revision": {"type": "integer"},
                    "nodes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["node", "leader", "exchanges"],
                            "properties": {
                                "node": {"type": "string"},
                                "leader": {"type": "boolean"},
                                "exchanges": {"type": "integer"},
                                "wait": {"type": "number"},
                                "in_flight": {"type": "integer"},
                                "backends": {"type": "integer"},
                                "at": {"type": "string", "nullable": True},
                            },
                        },
                    },
                },
            },
            "Worker": {
                "type": "object",
                "required": ["slot", "pid", "alive", "generation", "restarts", "requests"],
                "properties": {
                    "slot": {"type": "integer"},
                    "pid": {"type": "integer"},
                    "alive": {"type": "boolean"},
                    "generation": {"type": "integer"},
                    "restarts": {"type": "integer"},
                    "requests": {"type": "integer"},
                    "connections": {"type": "integer"},
                    "in_flight": {"type": "integer"},
                },
            },
            "Decision": {
                "type": "object",
                "required": ["at", "action", "reason", "size_before", "size_after", "acted"],
                "properties": {
                    "at": {"type": "string", "format": "date-time"},
                    "action": {"type": "string", "enum": ["none", "up", "down", "replace"]},
                    "reason": {"type": "string"},
                    "size_before": {"type": "integer"},
                    "size_after": {"type": "integer"},
                    "acted": {"type": "boolean"},
                    # The pool's cost per hour before and after; null when not known.
                    "cost_before": _NUM,
                    "cost_after": _NUM,
                },
            },
            "Cost": {
                "type": "object",
                "description": "What the pool costs per hour now, in US dollars "
                "(docs/autoscaling.md, What the pool costs)",
                "required": ["per_hour", "machines", "unpriced", "new_backend"],
                "properties": {
                    "per_hour": {"type": "number", "minimum": 0},
                    "machines": {"type": "integer", "minimum": 0},
                    "unpriced": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "machines whose price is not known, not in per_hour",
                    },
                    "new_backend": {**_NUM, "description": "what one more backend costs"},
                    "max-cost-per-hour": {**_NUM, "description": "the cap; null: none"},
                },
            },
            "Autoscaler": {
                "type": "object",
                "required": ["enabled", "paused", "config", "decisions"],
                "properties": {
                    "scale_to_zero": {
                        "type": "object",
                        "nullable": True,
                        "properties": {
                            "asleep": {"type": "boolean"},
                            "waking": {"type": "boolean"},
                            "waiting": {"type": "integer"},
                            "quiet_for": _NUM,
                            "idle_after": {"type": "number"},
                            "sleeps_in": _NUM,
                        },
                    },
                    "enabled": {"type": "boolean"},
                    "paused": {"type": "boolean"},
                    "config": {
                        "type": "object",
                        "properties": {
                            "min-backends": {"type": "integer"},
                            "max-backends": {"type": "integer"},
                        },
                    },
                    "mode": {"type": "string", "enum": ["threshold", "target"]},
                    "dry_run": {"type": "boolean"},
                    "min-backends": {"type": "integer"},
                    "max-backends": {"type": "integer"},
                    "overrides": {"type": "object"},
                    "desired": {"type": "integer", "nullable": True},
                    "actual": {"type": "integer"},
                    "signal": {"type": "object"},
                    "last_error": {"type": "string", "nullable": True},
                    "backoff": {"type": "number"},
                    "create_error": {"type": "string", "nullable": True},
                    "decisions": {"type": "array", "items": _ref("Decision")},
                    "cost": _ref("Cost"),
                },
            },
            "Rollout": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "phase": {
                        "type": "string",
                        "enum": ["canary", "steps", "rolling-back", "done", "rolled-back"],
                    },
                    "spec": {
                        "type": "object",
                        "description": "image, size, command; user_data as its size and hash",
                    },
                    "target": {"type": "integer", "nullable": True},
                    "started": {"type": "string"},
                    "updated": {"type": "string"},
                    "reason": {"type": "string"},
                    "old": {"type": "integer"},
                    "new": {"type": "integer"},
                    "window": {
                        "type": "object",
                        "properties": {
                            "kind": {"type": "string", "enum": ["canary", "step"]},
                            "seconds": {"type": "number"},
                            "left": {"type": "number"},
                        },
                    },
                    "verdicts": {"type": "array", "items": {"type": "object"}},
                },
            },
            "Rollouts": {
                "type": "object",
                "required": ["enabled", "current", "history"],
                "properties": {
                    "enabled": {"type": "boolean"},
                    # A Rollout (3.0 ignores nullable beside a $ref, so it is said in words).
                    "current": {
                        "type": "object",
                        "nullable": True,
                        "description": "the rollout in progress (a Rollout), null when none",
                    },
                    "history": {"type": "array", "items": _ref("Rollout")},
                    "settings": {"type": "object"},
                    "spec": {"type": "object"},
                },
            },
            "Event": {
                "type": "object",
                "required": ["id", "time", "kind", "level", "message"],
                "properties": {
                    "id": {"type": "integer"},
                    "time": {"type": "number"},
                    "kind": {
                        "type": "string",
                        "enum": [
                            "health",
                            "ejection",
                            "reload",
                            "scaling",
                            "reconcile",
                            "membership",
                            "autoscaler",
                            "rollout",
                        ],
                    },
                    "level": {"type": "string", "enum": ["info", "warning", "error"]},
                    "message": {"type": "string"},
                    "data": {"type": "object"},
                },
            },
        },
    },
    "paths": {
        "/healthz": {
            "get": {
                "summary": "200 while the proxy serves, 503 while it shuts down",
                "responses": {
                    "200": _json({"type": "object"}, "serving"),
                    "503": _json({"type": "object"}, "stopping"),
                    **_AUTH,
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format; docs/metrics.md)",
                "responses": {
                    "200": {
                        "description": "the metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_AUTH,
                },
            }
        },
        "/api/status": {
            "get": {
                "summary": "the pool, the listener, the config generation",
                "responses": {"200": _json(_ref("Status"), "the status"), **_AUTH},
            }
        },
        "/api/autoscaler": {
            "get": {
                "summary": "mode, paused, limits, desired vs actual, signal, last decisions",
                "responses": {"200": _json(_ref("Autoscaler"), "the autoscaler"), **_AUTH},
            },
            "put": {
                "summary": "override min-backends and/or max-backends (null: the config's); "
                "kept across restarts",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "min-backends": {"type": "integer", "nullable": True},
                                    "max-backends": {"type": "integer", "nullable": True},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("Autoscaler"), "the autoscaler with the new limits"),
                    "400": _ERR,
                    "409": _ERR,
                    **_AUTH,
                },
            },
        },
        "/api/autoscaler/{verb}": {
            "post": {
                "summary": "pause (decide and show, never act) or resume; kept across restarts",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "verb",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": ["pause", "resume"]},
                    }
                ],
                "responses": {
                    "200": _json(_ref("Autoscaler"), "the autoscaler"),
                    "409": _ERR,
                    **_AUTH,
                },
            }
        },
        "/api/rollouts": {
            "get": {
                "summary": "the rollout in progress (null when none) and the last ones that ended",
                "responses": {"200": _json(_ref("Rollouts"), "the rollouts"), **_AUTH},
            },
            "post": {
                "summary": "begin a rollout to a new spec (docs/rollouts.md); no field: the "
                "config's spec",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "image": {"type": "string"},
                                    "size": {"type": "string"},
                                    "user_data": {"type": "string"},
                                    "command": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "202": _json(_ref("Rollout"), "the rollout, begun"),
                    "400": _ERR,
                    "403": _ERR,
                    "409": _ERR,
                    **_AUTH,
                },
            },
        },
        "/api/rollouts/abort": {
            "post": {
                "summary": "stop the rollout in progress and roll back",
                "security": [{"bearer": []}],
                "responses": {
                    "202": _json(_ref("Rollout"), "the rollout, rolling back"),
                    "409": _ERR,
                    **_AUTH,
                },
            }
        },
        "/api/events": {
            "get": {
                "summary": "the recent events (a bounded ring) after an id",
                "parameters": [
                    {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["last_id", "events"],
                            "properties": {
                                "last_id": {"type": "integer"},
                                "events": {"type": "array", "items": _ref("Event")},
                            },
                        },
                        "the events, oldest first",
                    ),
                    "400": _ERR,
                    **_AUTH,
                },
            }
        },
        "/api/events/stream": {
            "get": {
                "summary": "Server-Sent Events: each event as id/event/data; resumes after "
                "Last-Event-ID",
                "responses": {
                    "200": {
                        "description": "an endless event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_AUTH,
                },
            }
        },
        "/api/backends/{id}/{verb}": {
            "post": {
                "summary": "drain (no new requests, in-flight ones finish, then disabled), "
                "enable or disable a backend; recorded in the inventory",
                "security": [{"bearer": []}],
                "parameters": [
                    _ID,
                    {
                        "name": "verb",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": ["drain", "enable", "disable"]},
                    },
                ],
                "responses": {
                    "200": _json(_ref("Backend"), "the backend after the change"),
                    "404": _ERR,
                    "409": _ERR,
                    **_AUTH,
                },
            }
        },
        "/api/backends/{id}/weight": {
            "put": {
                "summary": "set a backend's weight (0..1000); recorded in the inventory",
                "security": [{"bearer": []}],
                "parameters": [_ID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["weight"],
                                "properties": {"weight": {"type": "integer"}},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(_ref("Backend"), "the backend after the change"),
                    "400": _ERR,
                    "404": _ERR,
                    **_AUTH,
                },
            }
        },
        "/api/reload": {
            "post": {
                "summary": "reload the config and the inventory (as SIGHUP does)",
                "security": [{"bearer": []}],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "reloaded": {"type": "boolean"},
                                "generation": {"type": "integer"},
                            },
                        },
                        "the new configuration runs",
                    ),
                    "422": _json(_ref("Error"), "invalid: the running configuration stays"),
                    **_AUTH,
                },
            }
        },
        "/api/config": {
            "get": {
                "summary": "the running configuration, every secret redacted",
                "responses": {"200": _json({"type": "object"}, "the settings"), **_AUTH},
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0"), **_AUTH},
            }
        },
    },
}
