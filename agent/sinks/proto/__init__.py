"""Generated protobuf/gRPC code for Parca's profile store (see profilestore.proto)."""
