"""The package's metric instruments: names, units, descriptions and histogram buckets."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation

# Semantic-conventions buckets for HTTP durations, in seconds.
HTTP_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# SoftHSM signs in well under a millisecond; slow USB tokens take 0.7 s to 10 s.
HSM_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The package's metric instruments, made once per meter; the service and pool record on them."""

    def __init__(self, meter: Meter) -> None:
        self.http_request_duration: Histogram = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=HTTP_DURATION_BUCKETS,
        )
        self.hsm_operation_duration: Histogram = meter.create_histogram(
            "hsm.operation.duration",
            unit="s",
            description="Duration of PKCS#11 operations, queueing included.",
            explicit_bucket_boundaries_advisory=HSM_DURATION_BUCKETS,
        )
        self.cache_hits: Counter = meter.create_counter(
            "cache.hits", unit="{hit}", description="Answers served from cache."
        )
        self.cache_misses: Counter = meter.create_counter(
            "cache.misses", unit="{miss}", description="Lookups that had to go to the HSM."
        )
        self.signatures: Counter = meter.create_counter(
            "hsm.signatures", unit="{signature}", description="HSM signing operations, by outcome."
        )
        self._sources: dict[str, Callable[[], float | None]] = {}
        self._labelled: dict[str, Callable[[], Iterable[tuple[Mapping[str, str], float]]]] = {}
        for name, unit, description, make in (
            ("hsm.queue.depth", "{call}", "PKCS#11 calls waiting for a worker session.",
             meter.create_observable_gauge),
            ("hsm.queue.limit", "{call}", "PKCS#11 calls that may wait at once (hsm.queue_limit); more are refused.",
             meter.create_observable_gauge),
            ("hsm.ready", "1", "1 while the HSM is ready, 0 otherwise.", meter.create_observable_gauge),
            ("tokens.ready", "{token}", "Tokens serving (with two tokens, 1 while one of them is missing).",
             meter.create_observable_gauge),
            ("tokens.configured", "{token}", "Tokens the module is configured with (1, or 2 with hsm.second_*).",
             meter.create_observable_gauge),
            ("hsm.recoveries", "{recovery}", "Times the HSM came back after being lost.",
             meter.create_observable_counter),
            ("hsm.pin_refused", "1",
             "1 while the token refuses the PIN (wrong, locked or expired; not retried until the PIN file "
             "changes), 0 otherwise.", meter.create_observable_gauge),
            ("hsm.restart_required", "1",
             "1 while the token changed in a way only a new process can re-read (the module exits to be "
             "restarted, once per change), 0 otherwise.", meter.create_observable_gauge),
            # Labelled with the token's label and serial: a swapped token shows as a new serial.
            ("hsm.token.info", "1",
             "1 for the token the module logged in to last, labelled hsm_token_label and hsm_token_serial.",
             meter.create_observable_gauge),
            # A point in time (Unix seconds) per credential, so an alert computes `- time()` itself
            # and one series per label says which credential it is.
            ("certificate.not_after.timestamp", "s",
             "When each X.509 credential in the HSM expires (its notAfter), in seconds since the Unix epoch.",
             meter.create_observable_gauge),
            ("certificate.renewal.consecutive_failures", "{failure}",
             "Renewal attempts of each operational certificate that failed in a row (0 after a success).",
             meter.create_observable_gauge),
            ("audit.dropped", "{record}",
             "Audit records dropped because the audit log's queue was full (non-blocking writes only).",
             meter.create_observable_counter),
        ):
            make(name, callbacks=[self._observer(name)], unit=unit, description=description)

    def watch(self, name: str, source: Callable[[], float | None]) -> None:
        """Report `source()` as the observable instrument `name` at every collection (None: no
        value this time). `source` must be quick and must not touch the HSM."""
        self._sources[name] = source

    def watch_each(self, name: str, source: Callable[[], Iterable[tuple[Mapping[str, str], float]]]) -> None:
        """Like `watch`, one observation per (attributes, value) that `source()` yields."""
        self._labelled[name] = source

    def watch_queue_depth(self, source: Callable[[], int]) -> None:
        """Report `source()` as hsm.queue.depth at every collection (e.g. the pool's queue size)."""
        self.watch("hsm.queue.depth", source)

    def _observer(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            labelled = self._labelled.get(name)
            if labelled is not None:
                return [Observation(value, dict(attributes)) for attributes, value in labelled()]
            source = self._sources.get(name)
            value = None if source is None else source()
            return [] if value is None else [Observation(value)]
        return observe
