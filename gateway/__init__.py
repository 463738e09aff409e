"""The gateway: toolmesh's public gRPC API that validates, authenticates and orchestrates a Run."""
