"""Default-deny authorisation: which principal may do which operation on which device or key.

Rules come from the config (config.PolicyRule). Patterns are shell-style globs matched case-
sensitively; `{cn}` in a pattern is the caller's own name, escaped so that a name containing
glob characters matches only itself. `operations: ["*"]` is every operation.

The module twin can set rules too, but never widen the config file's: with a `ceiling` (the
file's rules), a request must be allowed by both. What a rule allows never reaches a key
reserved for another job (keyroles): that is decided apart from any policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..config import PolicyRule


@dataclass(frozen=True)
class Request:
    principal: str
    operation: str
    device: str | None = None     # device or registration id, for operations that have one
    key: str | None = None        # HSM key or credential label
    key_named_by_caller: bool = False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


class Policy:
    def __init__(self, rules: Sequence[PolicyRule], ceiling: Sequence[PolicyRule] | None = None) -> None:
        self.rules = tuple(rules)
        self.ceiling = None if ceiling is None or tuple(ceiling) == self.rules else tuple(ceiling)

    def decide(self, req: Request) -> Decision:
        for index, rule in enumerate(self.rules):
            if self._applies(rule, req):
                if self.ceiling is not None and not any(self._applies(r, req) for r in self.ceiling):
                    break  # the twin's rule reaches past what the config file allows
                return Decision(True, f"policy rule {index}")
        return Decision(False, self._denial(req))

    def _applies(self, rule: PolicyRule, req: Request) -> bool:
        if not _any_match(req.principal, rule.principals, req.principal):
            return False
        if "*" not in rule.operations and req.operation not in rule.operations:
            return False
        if req.device is not None and not _any_match(req.device, rule.devices, req.principal):
            return False
        if req.key is not None:
            if rule.keys:
                return _any_match(req.key, rule.keys, req.principal)
            return not req.key_named_by_caller
        return True

    def _denial(self, req: Request) -> str:
        """Told to the caller: a key the configuration chose for it is not named."""
        key = req.key if req.key_named_by_caller else None
        target = " ".join(f"{k} '{v}'" for k, v in (("device", req.device), ("key", key)) if v is not None)
        return f"no policy rule allows '{req.principal}' the operation '{req.operation}'" + (
            f" on {target}" if target else "")


def _any_match(value: str, patterns: Sequence[str], cn: str) -> bool:
    escaped = _escape(cn)
    return any(fnmatchcase(value, p.replace("{cn}", escaped)) for p in patterns)


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
