"""The auth service: issues and verifies tokens, publishes keys, revocations and the policy."""
