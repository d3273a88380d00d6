"""The guest zone: the agent that runs inside the UVM. Imports only the stdlib and sandbox.shared."""
