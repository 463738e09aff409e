"""Pure implementations behind the published tools; no gRPC or storage here."""
