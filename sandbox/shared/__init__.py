"""The shared zone: stdlib-only code imported by both the host and the guest agent."""
