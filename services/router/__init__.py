"""The router service: tool registry, routing by confidence, and guarded tool execution."""
