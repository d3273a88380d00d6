"""The enforcement gate: deny-all until one policy whose hash equals HOST_DATA is installed.

After that, every state-changing request goes through the policy engine, as a typed input
(sandbox/shared/policy/inputs.py) whose type names the enforcement point. The engine commits its own
state only when the decision allows and the action (the real mount/create/exec) succeeds; the gate
returns what the action returned.

While a request is served under `recording()`, the gate notes each question it asked the engine
(point, input, decision, whether the action failed): the agent sends them back with the reply, so the
host can write the exact `policy check` trace of what it asked (docs/policy-trace.md) without guessing
what the guest derived itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from sandbox.guest.hostdata import HostData, HostDataUnavailable
from sandbox.guest.lazy import LazyModule
from sandbox.shared import codec, sha2
from sandbox.shared.protocol import ErrorCode, PolicyCheck, ProtocolError

if TYPE_CHECKING:
    from sandbox.shared.policy import engine as policy_engine
    from sandbox.shared.policy import inputs as policy_inputs
    from sandbox.shared.policy.engine import Decision, PolicyEngine
    from sandbox.shared.policy.inputs import EnforcementInput
else:
    # The policy engine loads with the first policy, not at boot.
    policy_engine = LazyModule("sandbox.shared.policy.engine")
    policy_inputs = LazyModule("sandbox.shared.policy.inputs")

T = TypeVar("T")

NO_POLICY_REASON = "no execution policy has been set: the agent denies every request until set_policy succeeds"


class Gate:
    def __init__(self, host_data: Callable[[], HostData]) -> None:
        self._host_data = host_data
        self._lock = threading.Lock()
        self._engine: PolicyEngine | None = None
        self.policy_hash: str | None = None
        self.host_data_source: str | None = None
        self.enforce_seconds = 0.0        # total time spent deciding (benchmarks read it)
        self.last_enforce_seconds = 0.0
        self.last_enforce_cpu_seconds = 0.0
        self._recording = threading.local()   # per port thread: the checks of the request it serves

    @contextmanager
    def recording(self) -> Iterator[list[PolicyCheck]]:
        """Note every enforcement this thread makes inside the block (one request) in the yielded list."""
        checks: list[PolicyCheck] = []
        self._recording.checks = checks
        try:
            yield checks
        finally:
            self._recording.checks = None

    def _note(self, input: EnforcementInput, allowed: bool, action_failed: bool = False) -> None:
        checks = getattr(self._recording, "checks", None)
        if checks is not None:
            checks.append(PolicyCheck(policy_inputs.point_of(input).value, input.to_json(), allowed, action_failed))

    @property
    def active(self) -> bool:
        return self._engine is not None

    @property
    def policy(self) -> Any:
        """The installed policy model, or None before set_policy (the attestation API reads key_brokers)."""
        engine = self._engine
        return engine.policy if engine is not None else None

    def fragments(self) -> list[str]:
        """The namespaces of the fragments loaded so far, in order."""
        engine = self._engine
        return [f["namespace"] for f in engine.snapshot()["fragments"]] if engine is not None else []

    def install(self, raw: bytes) -> str:
        with self._lock:
            if self._engine is not None:
                raise ProtocolError(ErrorCode.policy_already_set,
                                    f"a policy is already set (sha256 {self.policy_hash}); it can be set only once")
            digest = sha2.sha256(raw).digest()
            try:
                host = self._host_data()
            except HostDataUnavailable as e:
                raise ProtocolError(ErrorCode.unavailable, f"cannot verify the policy: {e}") from None
            # Both are public (the host sent the policy, and HOST_DATA is in every report): a plain
            # comparison leaks nothing, and hmac would load OpenSSL (about 100 ms under TCG).
            if digest != host.value:
                raise ProtocolError(
                    ErrorCode.policy_mismatch,
                    f"policy sha256 {digest.hex()} does not match HOST_DATA {host.value.hex()} "
                    f"(from {host.source}); the agent stays deny-all",
                    details={"policy_hash": digest.hex(), "host_data": host.value.hex(), "source": host.source})
            try:
                engine = policy_engine.PolicyEngine.from_bytes(raw)
            except Exception as e:  # any rejection by the engine is a bad policy
                raise ProtocolError(ErrorCode.invalid_request, f"the policy was rejected: {e}") from None
            # _note() encodes each checked input with a codec compiled on first use: for create_container's
            # input that is about 20 ms under TCG, which would fall inside the first container's decision.
            # It depends on nothing the host sends, so it is compiled now, before any container is asked for.
            codec.prepare(policy_inputs.CreateContainerInput)
            self._engine = engine
            self.policy_hash = digest.hex()
            self.host_data_source = host.source
            return self.policy_hash

    def enforce(self, input: EnforcementInput, action: Callable[[Decision], T]) -> T:
        """Ask the engine at the input's enforcement point; raise policy_denied with its explanation, or
        run `action` under the engine's transaction and return what it returned."""
        engine = self._engine
        point = policy_inputs.point_of(input)
        if engine is None:
            raise ProtocolError(ErrorCode.policy_denied, NO_POLICY_REASON, details={"endpoint": point.value})
        # Enforcement time is the decision only: the clocks stop when the engine hands over to the action
        # (the real mount/create) and restart for the commit after it. Two clocks: wall time, and this
        # thread's CPU time, which leaves out whatever else the (single, emulated) vCPU was doing.
        in_action = _Stopwatch()

        def timed_action(decision: Decision) -> T:
            with in_action:
                return action(decision)

        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            decision, value = engine.transact(input, timed_action)
        except BaseException:
            if in_action.entered:   # allowed, but the mount/create failed: nothing was committed
                self._note(input, True, action_failed=True)
            raise
        self._note(input, decision.allowed)
        spent = time.perf_counter() - started - in_action.wall
        self.enforce_seconds += spent
        self.last_enforce_seconds = spent
        self.last_enforce_cpu_seconds = time.thread_time() - cpu_started - in_action.cpu
        if not decision.allowed:
            raise ProtocolError(ErrorCode.policy_denied, decision.reason or f"{point.value} denied by policy",
                                details={"endpoint": point.value})
        return value  # type: ignore[return-value]  # allowed: the action ran and returned it

    def require(self, input: EnforcementInput) -> None:
        """enforce() for a request that changes nothing: raise policy_denied unless the policy allows it."""
        self.enforce(input, _nothing)

    def allows(self, input: EnforcementInput) -> bool:
        """A read-only question (no action, no state change): does the policy allow this?"""
        if self._engine is None:
            return False
        return self._engine.enforce(input).allowed


def _nothing(_decision: Decision) -> None:
    return None


class _Stopwatch:
    """Wall and thread CPU time spent inside a `with` block."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.entered = False

    def __enter__(self) -> None:
        self.entered = True
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.thread_time() - self._cpu
