"""The bottom layer: small, dependency-light utilities every other package may use (docs/ARCHITECTURE.md).

Nothing here imports another package of this project. `io` (atomic durable writes, JSON, sha256,
config hashing), `dist` (rank and world size from the launcher's environment), `images` (float <->
uint8 conversion and PNG grids).
"""
