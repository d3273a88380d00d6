"""The key broker (host side): store, audit log, release decisions, HTTP service, client helpers."""
