"""Generated gRPC stubs for protos/hmlstm/v1 (never edit; `make protos` regenerates them)."""
