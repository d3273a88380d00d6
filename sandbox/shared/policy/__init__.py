"""The execution policy, shared by host and guest: the document model and the enforcement engine."""

from sandbox.shared.policy.engine import Decision, PolicyEngine
from sandbox.shared.policy.inputs import EnforcementPoint, PolicyInputError
from sandbox.shared.policy.model import Policy, canonical_bytes, parse_policy, policy_hash, validate_policy

__all__ = ["Decision", "EnforcementPoint", "Policy", "PolicyEngine", "PolicyInputError", "canonical_bytes",
           "parse_policy", "policy_hash", "validate_policy"]
