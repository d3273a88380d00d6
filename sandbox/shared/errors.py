"""Typed errors used across the project.

Library code raises these; only the CLI layer (sandbox.cli.errors) turns them into exit codes and
messages. Each carries a one-line message and an optional hint telling the user what to do next.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every expected failure. Never shown with a traceback unless --debug."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InputError(SandboxError):
    """Bad user input: a malformed file, an invalid spec, a bad argument value (exit 2)."""


class InvalidDocument(InputError):
    """A document (group spec, policy, trace) failed validation; `problems` holds 'path: message' lines."""

    def __init__(self, source: str, problems: list[str], hint: str | None = None) -> None:
        n = len(problems)
        super().__init__(f"{source} is invalid ({n} problem{'s' if n != 1 else ''})", hint)
        self.source = source
        self.problems = problems


class ToolMissing(SandboxError):
    """An external program the step needs is not installed."""


class ToolError(SandboxError):
    """An external program ran and failed."""

    def __init__(self, message: str, hint: str | None = None, *, returncode: int | None = None,
                 stderr: str = "") -> None:
        super().__init__(message, hint)
        self.returncode = returncode
        self.stderr = stderr


class NetworkError(SandboxError):
    """A remote service (registry, KDS, key broker) could not be reached or refused us."""


class NotFoundError(InputError):
    """A named object (sandbox, image, secret, file) does not exist: an input error (exit 2)."""


class StateError(SandboxError):
    """On-disk state is inconsistent or locked by another process."""


class CheckFailed(SandboxError):
    """A verification ran to completion and one of its checks failed (exit 1)."""


class PolicyDenied(SandboxError):
    """The execution policy refused a request; the message carries the engine's explanation."""


class GuestError(SandboxError):
    """The guest agent reported an error or stopped answering."""


class GuestOperationFailed(SandboxError):
    """Inside the guest: an operation the agent carried out failed (a disk, a mount, crun, a user lookup,
    the scratch filesystem...). The agent answers the request with ErrorCode.failed and this message;
    the host raises it again as a GuestError (sandbox.launch.agent_client.AgentError)."""


class AttestationError(SandboxError):
    """Attestation evidence could not be produced (no TEE interface, a firmware error...)."""


# `exec` passes the command's exit code through; sandbox/cli/errors.py maps its own outcomes to codes
# out of the command's way (docs/cli.md, "Exit codes").
class ExecSetupError(SandboxError):
    """exec could not run the command at all: no such sandbox/container, not running, the agent
    unreachable, a usage error (exit 125, docker's and podman's code for their own errors)."""


class ExecDenied(PolicyDenied):
    """The policy refused to exec the command (exit 77, sysexits' EX_NOPERM)."""


class ExecCannotInvoke(SandboxError):
    """The command exists but cannot be executed, e.g. permission denied (exit 126)."""


class ExecNotFound(SandboxError):
    """The command to exec does not exist in the container (exit 127)."""


class KeyReleaseRefused(CheckFailed):
    """A key broker refused to release a secret: the evidence does not satisfy its release policy."""
