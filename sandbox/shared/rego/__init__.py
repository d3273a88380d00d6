"""ACI's Rego policy modules, read without a Rego evaluator (stdlib only: this runs in the guest).

`syntax` parses the subset of Rego that policy and fragment modules use for their data (constant
assignments and delegations to ACI's framework); `framework` holds what hcsshim's framework.rego
and api.rego decide about versions, defaults and enforcement points; `policy` and `fragment` read
a parsed module as a policy or as a fragment, applying the framework's version-dependent defaults,
so that what comes out is the data the framework itself would evaluate (docs/aci.md).
"""
