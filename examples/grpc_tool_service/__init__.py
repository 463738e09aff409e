"""An example team tool service: implements toolmesh.tool.v1.ToolService (see README.md)."""
